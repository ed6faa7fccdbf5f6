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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

impl Subscription {
    /// Change updates only (old/new per changed object).
    pub const CHANGES: Subscription = Subscription {
        changes: true,
        events: false,
    };
    /// Every-event notifications only (current states of touched resources).
    pub const EVENTS: Subscription = Subscription {
        changes: false,
        events: true,
    };
    /// Nothing (an instance that does not run).
    pub const NONE: Subscription = Subscription {
        changes: false,
        events: false,
    };
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
///
/// The engine posts the *names* of touched resources ([`Mailbox::post_names`]); their states are fetched
/// from the engine when the reader is ready for them (the engine fills them in between two chunks), not
/// at every chunk. A snapshot handed out is an `Arc` the engine must copy before it changes that resource
/// again, so fetching once per read instead of once per chunk saves most of those copies when the reader
/// is slower than the stream. Explicit states ([`Mailbox::post`]) are delivered as given.
#[derive(Default)]
pub struct Mailbox {
    inner: Mutex<MailboxInner>,
    notify: Notify,
    /// Where the reader asks the engine for the states it needs; `None` for a mailbox fed only
    /// explicit states.
    fetch: Option<Arc<FetchRequests>>,
}

enum Pending {
    State(Option<Arc<Resource>>),
    /// The state is to be fetched from the engine.
    Fetch,
}

#[derive(Default)]
struct MailboxInner {
    pending: HashMap<Arc<str>, Pending>,
    /// Number of `Pending::Fetch` entries.
    to_fetch: usize,
    /// The reader asked for the pending names to be filled in.
    want_fill: bool,
    closed: bool,
}

/// How readers of every-event mailboxes ask the engine task to fill in the states they wait for.
#[derive(Default)]
pub struct FetchRequests {
    requested: AtomicBool,
    notify: Notify,
}

impl FetchRequests {
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether a reader asked since the last call.
    pub fn take(&self) -> bool {
        self.requested.swap(false, Ordering::AcqRel)
    }

    /// Completes when a reader asks (or asked since the last wait).
    pub async fn requested(&self) {
        self.notify.notified().await
    }
}

enum Take {
    Items(Touched),
    Wait,
    Closed,
}

impl MailboxInner {
    fn set(&mut self, k: &Arc<str>, p: Pending) {
        let fetch = matches!(p, Pending::Fetch);
        match self.pending.insert(k.clone(), p) {
            Some(Pending::Fetch) => {
                if !fetch {
                    self.to_fetch -= 1
                }
            }
            _ => {
                if fetch {
                    self.to_fetch += 1
                }
            }
        }
    }

    fn fill(&mut self, state: &dyn Fn(&str) -> Option<Arc<Resource>>) {
        if self.to_fetch > 0 {
            for (k, p) in self.pending.iter_mut() {
                if matches!(p, Pending::Fetch) {
                    *p = Pending::State(state(k));
                }
            }
            self.to_fetch = 0;
        }
        self.want_fill = false;
    }
}

impl Mailbox {
    /// A mailbox whose reader asks `fetch` for the states of names posted with [`Mailbox::post_names`].
    pub fn with_fetch(fetch: Arc<FetchRequests>) -> Mailbox {
        Mailbox {
            fetch: Some(fetch),
            ..Default::default()
        }
    }

    /// Posts resources with their states (`None` = gone).
    pub fn post(&self, items: &[(Arc<str>, Option<Arc<Resource>>)]) {
        if items.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in items {
            g.set(k, Pending::State(v.clone()));
        }
        drop(g);
        self.notify.notify_one();
    }

    /// Posts the names of touched resources; their states are looked up with `state` when the reader
    /// wants them: now if it waits for them, otherwise at a later [`Mailbox::fill`].
    pub fn post_names(&self, names: &[Arc<str>], state: &dyn Fn(&str) -> Option<Arc<Resource>>) {
        if names.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for k in names {
            if !matches!(g.pending.get(k), Some(Pending::Fetch)) {
                g.set(k, Pending::Fetch);
            }
        }
        let wake = g.want_fill;
        if wake {
            g.fill(state);
        }
        drop(g);
        if wake {
            self.notify.notify_one();
        }
    }

    /// Fills in the states of posted names if the reader asked for them (or `force`).
    pub fn fill(&self, state: &dyn Fn(&str) -> Option<Arc<Resource>>, force: bool) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if (g.want_fill || force) && g.to_fetch > 0 {
            g.fill(state);
            drop(g);
            self.notify.notify_one();
        }
    }

    pub fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.notify.notify_one();
    }

    /// Reader side: the entries whose states are known, sorted by name; asks for the others.
    fn take(&self) -> Take {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.to_fetch > 0 && (g.closed || self.fetch.is_none()) {
            // Nobody will fill these in any more.
            g.pending.retain(|_, p| matches!(p, Pending::State(_)));
            g.to_fetch = 0;
        }
        let known = g.pending.len() - g.to_fetch;
        let mut items: Touched = Vec::with_capacity(known);
        if known > 0 {
            if g.to_fetch == 0 {
                items.extend(g.pending.drain().map(|(k, p)| match p {
                    Pending::State(s) => (k, s),
                    Pending::Fetch => unreachable!("counted"),
                }));
            } else {
                g.pending.retain(|k, p| match p {
                    Pending::State(s) => {
                        items.push((k.clone(), s.take()));
                        false
                    }
                    Pending::Fetch => true,
                });
            }
            items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        let ask = g.to_fetch > 0;
        let closed = g.closed;
        if !closed {
            // Also when nothing is pending: the next names posted are filled in at once.
            g.want_fill = true;
        }
        drop(g);
        if ask {
            if let Some(f) = &self.fetch {
                f.request();
            }
        }
        if !items.is_empty() {
            Take::Items(items)
        } else if closed {
            Take::Closed
        } else {
            Take::Wait
        }
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

    /// Posts names of touched resources (see [`Mailbox::post_names`]).
    pub fn post_names(&self, names: &[Arc<str>], state: &dyn Fn(&str) -> Option<Arc<Resource>>) {
        if let Some(m) = &self.events {
            m.post_names(names, state);
        }
    }

    /// Fills in posted names the reader waits for (all of them with `force`, e.g. before closing).
    pub fn fill(&self, state: &dyn Fn(&str) -> Option<Arc<Resource>>, force: bool) {
        if let Some(m) = &self.events {
            m.fill(state, force);
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
    channel_with(sub, None)
}

/// A connected pair whose every-event mailbox asks `fetch` for the states of posted names.
pub fn channel_with(sub: Subscription, fetch: Option<Arc<FetchRequests>>) -> (Outbox, Inbox) {
    let queued = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = if sub.changes {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let mb = sub.events.then(|| {
        Arc::new(Mailbox {
            fetch: fetch.clone(),
            ..Default::default()
        })
    });
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
        // Items already queued are taken without waiting; the budget makes a reader with a long backlog
        // yield now and then, so that it shares its worker and can be aborted (shutdown deadline).
        tokio::task::coop::consume_budget().await;
        loop {
            // Change updates first, as they come.
            if let Some(rx) = self.changes.as_mut() {
                match rx.try_recv() {
                    Ok(u) => {
                        self.queued.fetch_sub(1, Ordering::Relaxed);
                        return Some(Delivery::Change(u));
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => self.changes = None,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
            }
            if let (Some(mb), false) = (&self.events, self.events_closed) {
                match mb.take() {
                    Take::Items(items) => return Some(Delivery::Resources(items)),
                    Take::Closed => self.events_closed = true,
                    Take::Wait => {}
                }
            }
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
                _ = async { self.events.as_ref().expect("checked").notify.notified().await }, if events_open => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn res(name: &str, score: u32) -> Arc<Resource> {
        let mut r = Resource::new(name);
        r.promotion_score = score;
        Arc::new(r)
    }

    #[test]
    fn names_are_filled_in_when_the_reader_asks() {
        let fetch = Arc::new(FetchRequests::default());
        let mb = Mailbox::with_fetch(fetch.clone());
        let lookups = Cell::new(0);
        let score = Cell::new(1);
        let lookup = |n: &str| {
            lookups.set(lookups.get() + 1);
            Some(res(n, score.get()))
        };
        let names: Vec<Arc<str>> = vec![Arc::from("b"), Arc::from("a")];
        // The reader has not asked yet: names are kept, no state is taken from the engine.
        mb.post_names(&names, &lookup);
        mb.post_names(&names[..1], &lookup);
        assert_eq!((lookups.get(), mb.pending()), (0, 2));
        assert!(!fetch.take());
        // The reader finds names only: it asks and waits.
        assert!(matches!(mb.take(), Take::Wait));
        assert!(fetch.take(), "the engine is asked");
        // The engine fills them in with the state current then.
        score.set(7);
        mb.fill(&lookup, false);
        assert_eq!(lookups.get(), 2);
        let Take::Items(items) = mb.take() else {
            panic!("states expected")
        };
        let got: Vec<_> = items
            .iter()
            .map(|(n, r)| (n.to_string(), r.as_ref().map(|r| r.promotion_score)))
            .collect();
        assert_eq!(got, [("a".into(), Some(7)), ("b".into(), Some(7))]);
        // Now the reader waits for more: the next names are filled in at once.
        assert!(matches!(mb.take(), Take::Wait));
        mb.post_names(&names[..1], &lookup);
        assert_eq!(lookups.get(), 3);
        // ... and only once: later names wait for the reader's next request.
        mb.post_names(&names[1..], &lookup);
        assert_eq!(lookups.get(), 3);
        let Take::Items(items) = mb.take() else {
            panic!("states expected")
        };
        assert_eq!(items.len(), 1);
        assert_eq!(mb.pending(), 1);
        // Closing after a forced fill delivers the rest, then the end.
        mb.fill(&lookup, true);
        mb.close();
        assert!(matches!(mb.take(), Take::Items(i) if i.len() == 1));
        assert!(matches!(mb.take(), Take::Closed));
    }

    #[test]
    fn explicit_states_replace_names_and_the_reverse() {
        let fetch = Arc::new(FetchRequests::default());
        let mb = Mailbox::with_fetch(fetch);
        let a: Arc<str> = Arc::from("a");
        mb.post_names(std::slice::from_ref(&a), &|n| Some(res(n, 1)));
        mb.post(&[(a.clone(), None)]);
        // The explicit state is deliverable without the engine.
        assert!(matches!(mb.take(), Take::Items(i) if i.len() == 1 && i[0].1.is_none()));
        assert_eq!(mb.pending(), 0);
    }
}
