//! Policy YAML on arbitrary input: parsing and validation never panic, and a policy that is accepted
//! turns into plugin instances whose configuration every plugin either builds or rejects with an error.
#![no_main]
use drbd_reactor::plugins::{Builtin, PluginFactory};
use drbd_reactor::policy::{desired_instances, parse_documents};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = parse_documents(text) else {
        return;
    };
    let labels = BTreeMap::new();
    let factory = Builtin::default();
    for spec in desired_instances(&policies, &labels) {
        let _ = factory.build(&spec);
    }
});
