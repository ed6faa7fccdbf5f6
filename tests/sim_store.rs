//! The journal under concurrent writers: nothing lost, sequence numbers dense, every reader's fold
//! equals the writers' fold, refused operations are not appended.

use drbd_reactor::sim::model::{Op, SimError};
use drbd_reactor::sim::store::{Store, StoreError};
use std::collections::BTreeMap;

fn create(res: &str) -> Op {
    drbd_reactor::sim::cli::create_op(
        res,
        &["n1".into(), "n2".into(), "n3".into()],
        &[],
        &[],
        1,
        1 << 20,
        None,
        None,
        &[],
        BTreeMap::new(),
        true,
    )
    .unwrap()
}

#[test]
fn concurrent_writers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let d = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let s = Store::new(d);
                for i in 0..5 {
                    s.commit(&[create(&format!("r{t}-{i}"))]).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = Store::new(dir.path());
    let (entries, _) = s.read_from(0).unwrap();
    assert_eq!(entries.len(), 20);
    assert!(entries
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == i as u64 + 1));
    let l = s.load().unwrap();
    assert_eq!(l.cluster.resources.len(), 20);
    // Snapshots (every 64 entries) and replays agree.
    for i in 0..80 {
        s.commit(&[Op::Write {
            node: "n1".into(),
            res: "r0-0".into(),
            vol: None,
            kib: 1,
        }])
        .map(|_| ())
        .or_else(|e| {
            if i == 0 {
                s.commit(&[Op::Primary {
                    node: "n1".into(),
                    res: "r0-0".into(),
                    force: false,
                }])
                .map(|_| ())
            } else {
                Err(e)
            }
        })
        .unwrap();
    }
    assert!(dir.path().join("snapshot.json").exists());
    let mut fresh = drbd_reactor::sim::model::Cluster::default();
    for e in s.read_from(0).unwrap().0 {
        fresh.apply(&e.op, e.at, &mut |_, _| {}).unwrap();
    }
    assert_eq!(fresh, s.load().unwrap().cluster);
}

#[test]
fn refused_operations_are_not_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::new(dir.path());
    s.commit(&[create("r0")]).unwrap();
    s.commit(&[Op::Primary {
        node: "n1".into(),
        res: "r0".into(),
        force: false,
    }])
    .unwrap();
    let before = s.journal_len();
    let e = s
        .commit(&[Op::Primary {
            node: "n2".into(),
            res: "r0".into(),
            force: false,
        }])
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Sim(SimError::StateChange { code: -1, .. })),
        "{e}"
    );
    assert_eq!(s.journal_len(), before);
}
