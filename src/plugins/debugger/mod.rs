//! Debugger plugin: prints every change update it receives as one JSON object per line.

use super::{Delivery, Inbox, Plugin, PluginCtx, PluginError, Subscription};
use futures::future::BoxFuture;
use futures::FutureExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::io::Write;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Output {
    /// Through the agent's log (level info, target `debugger`).
    #[default]
    Log,
    /// Straight to the agent's standard output, one JSON object per line.
    Stdout,
}

/// `spec.debugger` of a ReactorPolicy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DebuggerSpec {
    /// Where updates are printed: `log` (default) or `stdout`.
    #[serde(default)]
    pub output: Output,
}

pub struct Debugger {
    spec: DebuggerSpec,
}

impl Debugger {
    pub fn from_config(v: &serde_json::Value) -> Result<Debugger, PluginError> {
        let spec =
            serde_json::from_value(v.clone()).map_err(|e| PluginError::Config(e.to_string()))?;
        Ok(Debugger { spec })
    }
}

/// The line printed for one delivery (pure).
pub fn render(d: &Delivery) -> Option<String> {
    match d {
        Delivery::Change(u) => Some(u.to_json()),
        Delivery::Resources(_) => None,
    }
}

impl Plugin for Debugger {
    fn subscription(&self) -> Subscription {
        Subscription::CHANGES
    }

    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            while let Some(d) = inbox.recv().await {
                let Some(line) = render(&d) else { continue };
                match self.spec.output {
                    Output::Log => tracing::info!(target: "debugger", instance = %ctx.id, "{line}"),
                    Output::Stdout => {
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "{line}")
                            .map_err(|e| PluginError::Failed(format!("stdout: {e}")))?;
                        out.flush()
                            .map_err(|e| PluginError::Failed(format!("stdout: {e}")))?;
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}
