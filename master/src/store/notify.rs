//! Notifications between masters sharing a PostgreSQL database (LISTEN/NOTIFY): the queue
//! changed, a control action, data API events.

use super::{Backend, Result, Store};

impl Store {
    /// Tells other masters sharing the database that the queue changed (PostgreSQL only; a
    /// SQLite database has one master).
    pub async fn notify_queue(&self) {
        if self.backend == Backend::Postgres
            && let Err(error) = sqlx::query("SELECT pg_notify('kiln_queue', '')").execute(&self.write).await
        {
            tracing::warn!(%error, "could not notify other masters");
        }
    }

    /// Sends a control message (a stop, a worker action) to every master sharing the database
    /// (PostgreSQL only).
    pub async fn notify_control(&self, payload: &str) {
        if self.backend == Backend::Postgres
            && let Err(error) =
                sqlx::query("SELECT pg_notify('kiln_control', $1)").bind(payload).execute(&self.write).await
        {
            tracing::warn!(%error, "could not notify other masters");
        }
    }

    /// Tells other masters sharing the database of data API events that happened here, encoded
    /// by [`crate::events::encode`] (PostgreSQL only).
    pub async fn notify_events(&self, payload: &str) {
        if self.backend == Backend::Postgres
            && let Err(error) =
                sqlx::query("SELECT pg_notify('kiln_events', $1)").bind(payload).execute(&self.write).await
        {
            tracing::warn!(%error, "could not share events with other masters");
        }
    }

    /// Subscribes to queue changes and control messages of other masters; `None` on SQLite.
    pub async fn listen_queue(&self, url: &str) -> Result<Option<QueueListener>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen_all(["kiln_queue", "kiln_control", "kiln_events"]).await?;
        Ok(Some(QueueListener(listener)))
    }
}

/// A subscription to the queue notifications of other masters.
pub struct QueueListener(sqlx::postgres::PgListener);

/// What another master said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// The queue changed.
    Queue,
    /// A control message, as sent with [`Store::notify_control`].
    Control(String),
    /// Data API events, as sent with [`Store::notify_events`].
    Events(String),
}

impl QueueListener {
    /// Waits for the next notification.
    pub async fn recv(&mut self) -> Result<Notification> {
        let notification = self.0.recv().await?;
        Ok(match notification.channel() {
            "kiln_control" => Notification::Control(notification.payload().to_owned()),
            "kiln_events" => Notification::Events(notification.payload().to_owned()),
            _ => Notification::Queue,
        })
    }
}
