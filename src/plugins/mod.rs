//! Plugin instances: the API every plugin implements, and how the engine delivers to them.
//!
//! A plugin instance is a task with an [`Inbox`]. It receives
//! - change updates (`Delivery::Change`), in order, none dropped, if it subscribes to changes, and/or
//! - resource notifications (`Delivery::Resources`): the current state of every resource touched since
//!   the last delivery, coalesced per resource, if it subscribes to every-event notifications.
//!
//! When the engine stops an instance it closes the inbox; `recv` then drains what is queued and returns
//! `None`, and the plugin runs its exit actions and returns.

pub mod debugger;
pub mod prometheus;
pub mod promoter;
pub mod umh;

use crate::drbd::state::Resource;
use crate::engine::update::Update;
use crate::metrics::AgentMetrics;
use futures::future::BoxFuture;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};

/// Identity of a plugin instance: the policy it comes from and the plugin type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct InstanceId {
    pub policy: String,
    #[serde(rename = "type")]
    pub kind: String,
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.policy, self.kind)
    }
}

/// What to run: identity plus the plugin's configuration in canonical form. Two specs with equal
/// configuration are the same instance, and a reload leaves it untouched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceSpec {
    pub id: InstanceId,
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription {
    pub changes: bool,
    pub events: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("unknown plugin type '{0}'")]
    UnknownType(String),
    #[error("{0}")]
    Failed(String),
}

/// Context handed to a running instance.
#[derive(Clone)]
pub struct PluginCtx {
    pub id: InstanceId,
    pub node_name: String,
    pub metrics: AgentMetrics,
    pub detail: DetailHandle,
    pub events: EventSink,
}

impl PluginCtx {
    /// Publishes a notable action of this instance (see [`EventSink`]).
    pub fn event(&self, warning: bool, reason: &str, message: impl Into<String>) {
        self.events.emit(PluginEvent {
            instance: self.id.clone(),
            warning,
            reason: reason.to_string(),
            message: message.into(),
        });
    }
}

/// A notable action of a plugin instance: promote, stop, failure, escalation, invalid configuration.
/// Logged in every mode; in Kubernetes mode also recorded as an Event on the instance's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEvent {
    pub instance: InstanceId,
    /// Kubernetes Event type: `Warning` when true, `Normal` otherwise.
    pub warning: bool,
    /// A short CamelCase reason, e.g. `Promoted`, `StartFailed`.
    pub reason: String,
    pub message: String,
}

/// Where plugin events go besides the log. The default sink only logs.
#[derive(Clone, Default)]
pub struct EventSink(Option<tokio::sync::mpsc::UnboundedSender<PluginEvent>>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "EventSink(channel)"
        } else {
            "EventSink(log)"
        })
    }
}

impl EventSink {
    pub fn new(tx: tokio::sync::mpsc::UnboundedSender<PluginEvent>) -> EventSink {
        EventSink(Some(tx))
    }

    pub fn emit(&self, ev: PluginEvent) {
        if ev.warning {
            tracing::warn!(instance = %ev.instance, reason = %ev.reason, "{}", ev.message);
        } else {
            tracing::info!(instance = %ev.instance, reason = %ev.reason, "{}", ev.message);
        }
        if let Some(tx) = &self.0 {
            let _ = tx.send(ev);
        }
    }
}

/// Lets a plugin publish a JSON explanation of what it is doing, shown under its entry in `/status`.
#[derive(Clone, Default)]
pub struct DetailHandle(Arc<Mutex<Option<serde_json::Value>>>);

impl DetailHandle {
    pub fn set(&self, v: serde_json::Value) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }
    pub fn get(&self) -> Option<serde_json::Value> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub trait Plugin: Send + 'static {
    fn subscription(&self) -> Subscription;
    fn run(
        self: Box<Self>,
        inbox: Inbox,
        ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>>;
}

/// Builds plugin instances from specs. The agent's factory knows the real plugins; tests bring their own.
pub trait PluginFactory: Send + Sync + 'static {
    fn build(&self, spec: &InstanceSpec) -> Result<Box<dyn Plugin>, PluginError>;
}

/// The factory of the real plugins, holding the services they share with the rest of the agent.
#[derive(Clone, Default)]
pub struct Builtin {
    /// Where exporter instances publish the DRBD state that `/metrics` renders.
    pub exporter: Arc<prometheus::ExporterHub>,
    /// Where UMH instances write their scripts and how they reach the host.
    pub umh: umh::UmhOptions,
    /// The service manager, unit directory and commands promoter instances use.
    pub promoter: promoter::PromoterOptions,
}

impl Builtin {
    pub fn new(exporter: Arc<prometheus::ExporterHub>) -> Builtin {
        Builtin {
            exporter,
            umh: umh::UmhOptions::default(),
            promoter: promoter::PromoterOptions::default(),
        }
    }

    /// The same factory with these UMH options.
    pub fn with_umh(self, umh: umh::UmhOptions) -> Builtin {
        Builtin { umh, ..self }
    }

    /// The same factory with these promoter options.
    pub fn with_promoter(self, promoter: promoter::PromoterOptions) -> Builtin {
        Builtin { promoter, ..self }
    }
}

impl PluginFactory for Builtin {
    fn build(&self, spec: &InstanceSpec) -> Result<Box<dyn Plugin>, PluginError> {
        match spec.id.kind.as_str() {
            "debugger" => Ok(Box::new(debugger::Debugger::from_config(&spec.config)?)),
            "prometheus" => Ok(Box::new(prometheus::Prometheus::from_config(
                &spec.config,
                self.exporter.clone(),
            )?)),
            "umh" => Ok(Box::new(umh::Umh::from_spec(spec, &self.umh)?)),
            "promoter" => Ok(Box::new(promoter::Promoter::from_spec(
                spec,
                &self.promoter,
            )?)),
            other => Err(PluginError::UnknownType(other.to_string())),
        }
    }
}

/// Resources touched since the last delivery with their current state (`None` = gone).
pub type Touched = Vec<(Arc<str>, Option<Arc<Resource>>)>;

pub enum Delivery {
    Change(Arc<Update>),
    /// Current state of resources touched since the last delivery; `None` = the resource is gone.
    Resources(Touched),
}

/// Coalescing mailbox for every-event notifications: at most one pending entry per resource, so its size
/// is bounded by the number of resources however slow the reader.
#[derive(Default)]
pub struct Mailbox {
    inner: Mutex<MailboxInner>,
    notify: Notify,
}

#[derive(Default)]
struct MailboxInner {
    pending: HashMap<Arc<str>, Option<Arc<Resource>>>,
    closed: bool,
}

impl Mailbox {
    pub fn post(&self, items: &[(Arc<str>, Option<Arc<Resource>>)]) {
        if items.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in items {
            g.pending.insert(k.clone(), v.clone());
        }
        drop(g);
        self.notify.notify_one();
    }

    pub fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.notify.notify_one();
    }

    /// Pending entries sorted by name, and whether the mailbox is closed.
    fn take(&self) -> (Touched, bool) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = g.pending.drain().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        (v, g.closed)
    }

    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .len()
    }
}

/// The sending side, held by the engine.
pub struct Outbox {
    pub changes: Option<mpsc::UnboundedSender<Arc<Update>>>,
    pub events: Option<Arc<Mailbox>>,
    pub queued: Arc<AtomicUsize>,
}

impl Outbox {
    /// Queues a change update; returns the queue length after it.
    pub fn send(&self, u: &Arc<Update>) -> usize {
        let Some(tx) = &self.changes else { return 0 };
        // Counted before it is sent: the reader may take it (and count it out) at once, on another thread.
        let n = self.queued.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        if tx.send(u.clone()).is_ok() {
            n
        } else {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            0
        }
    }

    pub fn post(&self, items: &[(Arc<str>, Option<Arc<Resource>>)]) {
        if let Some(m) = &self.events {
            m.post(items);
        }
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Closes both streams: the instance drains what is queued, then sees the end.
    pub fn close(&mut self) {
        self.changes = None;
        if let Some(m) = &self.events {
            m.close();
        }
    }
}

pub struct Inbox {
    changes: Option<mpsc::UnboundedReceiver<Arc<Update>>>,
    events: Option<Arc<Mailbox>>,
    queued: Arc<AtomicUsize>,
    events_closed: bool,
}

/// A connected outbox/inbox pair for a subscription.
pub fn channel(sub: Subscription) -> (Outbox, Inbox) {
    let queued = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = if sub.changes {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mb = sub.events.then(|| Arc::new(Mailbox::default()));
    (
        Outbox {
            changes: tx,
            events: mb.clone(),
            queued: queued.clone(),
        },
        Inbox {
            changes: rx,
            events: mb,
            queued,
            events_closed: false,
        },
    )
}

impl Inbox {
    /// The next delivery; `None` once the engine closed the inbox and everything queued was delivered.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            let changes_open = self.changes.is_some();
            let events_open = self.events.is_some() && !self.events_closed;
            if !changes_open && !events_open {
                return None;
            }
            tokio::select! {
                biased;
                u = async { self.changes.as_mut().expect("checked").recv().await }, if changes_open => {
                    match u {
                        Some(u) => {
                            self.queued.fetch_sub(1, Ordering::Relaxed);
                            return Some(Delivery::Change(u));
                        }
                        None => self.changes = None,
                    }
                }
                _ = async { self.events.as_ref().expect("checked").notify.notified().await }, if events_open => {
                    let (items, closed) = self.events.as_ref().expect("checked").take();
                    if closed {
                        self.events_closed = true;
                    }
                    if !items.is_empty() {
                        return Some(Delivery::Resources(items));
                    }
                }
            }
        }
    }
}
