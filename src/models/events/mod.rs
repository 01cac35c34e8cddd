//! Change events: the library's own write statements announce every change to models and
//! aliases with NOTIFY inside the changing transaction (`payload`: the channel, the bounded
//! JSON payload), subscriptions read them on a dedicated listening connection (`listener`),
//! and `wait_for_alias_change` waits on one for an alias to move (`wait`).

mod listener;
mod payload;
mod wait;

use std::sync::Arc;

pub use listener::{ModelEvents, MODEL_EVENTS_CAPACITY};
pub(crate) use payload::{notify, Notice};
pub use payload::{ModelEvent, ModelEventKind, MAX_EVENT_PAYLOAD_BYTES};

use crate::error::Result;
use crate::repository::{ModelRepository, Registration};

/// The events' per-repository state: the schema's channel and the live subscriptions.
#[derive(Debug)]
pub(crate) struct Events {
    pub(crate) channel: String,
    subscriptions: Arc<listener::Subscriptions>,
}

/// What the events ask of the repository: their state, and a stop of every subscription when
/// it closes.
pub(crate) fn register(registration: &mut Registration<'_>) {
    let subscriptions = Arc::new(listener::Subscriptions::default());
    let on_close = subscriptions.clone();
    registration.on_close(move || on_close.stop_all());
    registration.state(Events {
        channel: payload::channel(registration.config.schema_name()),
        subscriptions,
    });
}

impl ModelRepository {
    /// Subscribes to the change events of this repository's schema: every change the library
    /// makes to a model or an alias ([`ModelEventKind`]), from any process, delivered in
    /// commit order if and only if its transaction commits. The subscription holds one
    /// dedicated connection (outside the pool) and one thread until it is dropped or the
    /// repository closes.
    ///
    /// Changes other clients make with SQL (psql, Python) send no event: the library sends
    /// them from its own statements, never from triggers (on Citus those would run on the
    /// workers, whose notifications never reach the coordinator's listeners).
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// use pg_model_repo::ModelEventKind;
    /// let events = repo.subscribe_model_events()?;
    /// for event in events.receiver().iter() {
    ///     if event.kind == ModelEventKind::AliasSet && event.alias.as_deref() == Some("champion") {
    ///         let model = repo.load_model(&event.model_name, "@champion")?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn subscribe_model_events(&self) -> Result<ModelEvents> {
        self.timed("subscribe_model_events", |_call| {
            let events = self.state::<Events>();
            listener::start(
                self.config().sessions(),
                events.channel.clone(),
                &events.subscriptions,
                self.metrics(),
            )
        })
    }

    /// The LISTEN channel of this schema's change events, for clients that listen without
    /// this library (`LISTEN "model_events.ml"`; quote it). The SQL function
    /// `model_events_channel()` in the schema returns the same. Each notification's payload
    /// is one JSON object: `{"kind": "saved", "model": …, "version": …, "alias": …,
    /// "save_seq": …, "resave": false, "at_us": …}` (`at_us`: the database clock, in
    /// microseconds since the Unix epoch), at most [`MAX_EVENT_PAYLOAD_BYTES`] long.
    ///
    /// ```no_run
    /// # fn main() -> pg_model_repo::Result<()> {
    /// # let repo = pg_model_repo::ModelRepository::connect("postgres://app@localhost/ml")?;
    /// println!("LISTEN \"{}\"", repo.model_events_channel());
    /// # Ok(()) }
    /// ```
    pub fn model_events_channel(&self) -> &str {
        &self.state::<Events>().channel
    }

    /// The channel write paths notify on.
    pub(crate) fn events_channel(&self) -> &str {
        &self.state::<Events>().channel
    }
}
