//! What schedulers and pollers keep between runs: classified changes, timers, poller tips and leases.

use std::collections::BTreeMap;

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::changes::{CHANGE_COLUMNS, change_from_row};
use super::{Backend, Result, Store, get_i64};
use crate::domain::{Change, Firing, NewBuildset, NewChange, Submitted};

impl Store {
    /// Records a change a timed scheduler accepted, and moves its tree-stable timer to `fire_at`
    /// (`None` leaves the timer as it is: an unimportant change with no timer running).
    pub async fn classify_change(
        &self,
        scheduler: &str,
        timer_key: &str,
        changeid: i64,
        important: bool,
        fire_at: impl FnOnce(Option<i64>) -> Option<i64>,
    ) -> Result<()> {
        let mut tx = self.write.begin().await?;
        if !Self::acting_on(&mut tx, changeid, scheduler, self.now_ms()).await? {
            return Ok(());
        }
        let running = sqlx::query("SELECT fire_at FROM scheduler_timers WHERE scheduler = $1 AND timer_key = $2")
            .bind(scheduler)
            .bind(timer_key)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| get_i64(&row, "fire_at"))
            .transpose()?;
        let Some(fire_at) = fire_at(running) else {
            // An unimportant change with no timer running is not remembered, as in Buildbot.
            tx.commit().await?;
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO scheduler_changes (scheduler, timer_key, changeid, important) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (scheduler, changeid) DO NOTHING",
        )
        .bind(scheduler)
        .bind(timer_key)
        .bind(changeid)
        .bind(i64::from(important))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO scheduler_timers (scheduler, timer_key, fire_at) VALUES ($1, $2, $3) \
             ON CONFLICT (scheduler, timer_key) DO UPDATE SET fire_at = $3",
        )
        .bind(scheduler)
        .bind(timer_key)
        .bind(fire_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Remembers a change for a scheduler that builds only if something changed (Nightly and
    /// Periodic with `onlyIfChanged`).
    pub async fn remember_change(&self, scheduler: &str, changeid: i64, important: bool) -> Result<()> {
        let mut tx = self.write.begin().await?;
        if !Self::acting_on(&mut tx, changeid, scheduler, self.now_ms()).await? {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO scheduler_changes (scheduler, timer_key, changeid, important) VALUES ($1, '', $2, $3) \
             ON CONFLICT (scheduler, changeid) DO NOTHING",
        )
        .bind(scheduler)
        .bind(changeid)
        .bind(i64::from(important))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// When a timed scheduler fires next. `spec` describes its schedule: a scheduler never seen
    /// before fires at `first`; a stored time of another schedule (the configuration changed) is
    /// replaced by `changed`.
    pub async fn scheduler_next_fire(&self, scheduler: &str, spec: &str, first: i64, changed: i64) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO scheduler_fires (scheduler, spec, next_fire_at) VALUES ($1, $2, $3) \
             ON CONFLICT (scheduler) DO UPDATE SET spec = $2, next_fire_at = $4 WHERE scheduler_fires.spec <> $2 \
             RETURNING next_fire_at",
        )
        .bind(scheduler)
        .bind(spec)
        .bind(first)
        .bind(changed)
        .fetch_optional(&self.write)
        .await?;
        match row {
            Some(row) => get_i64(&row, "next_fire_at"),
            None => {
                let row = sqlx::query("SELECT next_fire_at FROM scheduler_fires WHERE scheduler = $1")
                    .bind(scheduler)
                    .fetch_one(&self.write)
                    .await?;
                get_i64(&row, "next_fire_at")
            }
        }
    }

    /// Fires a timed scheduler due at `due`: moves its next time to `next` and, in the same
    /// transaction, takes the changes remembered for it and submits what `make` builds from them
    /// (each with whether it was important).
    pub async fn fire_scheduled(
        &self,
        scheduler: &str,
        due: i64,
        next: i64,
        make: impl FnOnce(&[(Change, bool)]) -> Option<NewBuildset>,
    ) -> Result<Firing> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let moved =
            sqlx::query("UPDATE scheduler_fires SET next_fire_at = $1 WHERE scheduler = $2 AND next_fire_at = $3")
                .bind(next)
                .bind(scheduler)
                .bind(due)
                .execute(&mut *tx)
                .await?;
        if moved.rows_affected() == 0 {
            return Ok(Firing::TakenElsewhere);
        }
        let changes = Self::take_scheduler_changes(&mut tx, scheduler, "").await?;
        let mut collapsed = 0;
        let mut events = Vec::new();
        let submitted = match make(&changes) {
            Some(buildset) => Some(Self::add_buildset_in(&mut tx, &buildset, now, &mut collapsed, &mut events).await?),
            None => None,
        };
        tx.commit().await?;
        self.published(events);
        crate::telemetry::requests_collapsed(collapsed);
        Ok(Firing::Fired(submitted))
    }

    /// Takes (reads and forgets) the changes classified under one of a scheduler's timers, oldest
    /// first, each with whether it was important.
    pub(super) async fn take_scheduler_changes(
        conn: &mut AnyConnection,
        scheduler: &str,
        timer_key: &str,
    ) -> Result<Vec<(Change, bool)>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS}, s.important FROM scheduler_changes s JOIN changes c ON c.changeid = s.changeid \
             WHERE s.scheduler = $1 AND s.timer_key = $2 ORDER BY c.changeid"
        )))
        .bind(scheduler)
        .bind(timer_key)
        .fetch_all(&mut *conn)
        .await?;
        let changes = rows
            .iter()
            .map(|row| Ok((change_from_row(row)?, get_i64(row, "important")? != 0)))
            .collect::<Result<Vec<_>>>()?;
        sqlx::query("DELETE FROM scheduler_changes WHERE scheduler = $1 AND timer_key = $2")
            .bind(scheduler)
            .bind(timer_key)
            .execute(&mut *conn)
            .await?;
        Ok(changes)
    }

    /// When the next tree-stable timer fires, if any runs.
    pub async fn next_timer_at(&self) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT MIN(fire_at) AS next FROM scheduler_timers").fetch_one(&self.write).await?;
        Ok(row.try_get::<Option<i64>, _>("next")?)
    }

    /// Fires every timer due at `now`: takes its classified changes and submits the buildset
    /// `make` builds from them (`None` submits nothing), in one transaction per timer, so a timer
    /// fires exactly once even when several masters share the database. Returns the submitted
    /// buildsets.
    pub async fn fire_due_timers(
        &self,
        now: i64,
        make: impl Fn(&str, &[Change]) -> Option<NewBuildset>,
    ) -> Result<Vec<Submitted>> {
        let lock = self.skip_locked();
        let mut submitted = Vec::new();
        loop {
            let mut tx = self.write.begin().await?;
            let due = sqlx::query(AssertSqlSafe(format!(
                "SELECT scheduler, timer_key FROM scheduler_timers WHERE fire_at <= $1 ORDER BY fire_at LIMIT 1 {lock}"
            )))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(due) = due else { return Ok(submitted) };
            let scheduler: String = due.try_get("scheduler")?;
            let timer_key: String = due.try_get("timer_key")?;
            let taken = Self::take_scheduler_changes(&mut tx, &scheduler, &timer_key).await?;
            let changes: Vec<Change> = taken.into_iter().map(|(change, _)| change).collect();
            sqlx::query("DELETE FROM scheduler_timers WHERE scheduler = $1 AND timer_key = $2")
                .bind(&scheduler)
                .bind(&timer_key)
                .execute(&mut *tx)
                .await?;
            let mut collapsed = 0;
            let mut events = Vec::new();
            if let Some(buildset) = make(&scheduler, &changes) {
                submitted.push(Self::add_buildset_in(&mut tx, &buildset, now, &mut collapsed, &mut events).await?);
            }
            tx.commit().await?;
            self.published(events);
            crate::telemetry::requests_collapsed(collapsed);
        }
    }

    /// The branch tips a poller last recorded, and whether it ever recorded any.
    pub async fn poller_tips(&self, poller: &str) -> Result<(bool, BTreeMap<String, String>)> {
        let started = sqlx::query("SELECT 1 AS started FROM poller_started WHERE poller = $1")
            .bind(poller)
            .fetch_optional(&self.write)
            .await?
            .is_some();
        let rows = sqlx::query("SELECT branch, revision FROM poller_tips WHERE poller = $1")
            .bind(poller)
            .fetch_all(&self.write)
            .await?;
        let tips = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("branch")?, r.try_get::<String, _>("revision")?)))
            .collect::<Result<_>>()?;
        Ok((started, tips))
    }

    /// Records a poll: the new tips and the changes found, in one transaction, but only if the
    /// stored tips are still `expected` — otherwise another poll got there first and `None` is
    /// returned with nothing written. So a commit is reported once, however many masters poll.
    pub async fn record_poll(
        &self,
        poller: &str,
        expected: &BTreeMap<String, String>,
        tips: &BTreeMap<String, String>,
        changes: &[NewChange],
    ) -> Result<Option<Vec<Change>>> {
        let mut tx = self.write.begin().await?;
        // Taking the row lock first serialises concurrent polls of one poller on PostgreSQL.
        sqlx::query("INSERT INTO poller_started (poller) VALUES ($1) ON CONFLICT (poller) DO NOTHING")
            .bind(poller)
            .execute(&mut *tx)
            .await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT poller FROM poller_started WHERE poller = $1 FOR UPDATE")
                .bind(poller)
                .execute(&mut *tx)
                .await?;
        }
        let rows = sqlx::query("SELECT branch, revision FROM poller_tips WHERE poller = $1")
            .bind(poller)
            .fetch_all(&mut *tx)
            .await?;
        let current: BTreeMap<String, String> = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("branch")?, r.try_get::<String, _>("revision")?)))
            .collect::<Result<_>>()?;
        if &current != expected {
            return Ok(None);
        }
        sqlx::query("DELETE FROM poller_tips WHERE poller = $1").bind(poller).execute(&mut *tx).await?;
        for (branch, revision) in tips {
            sqlx::query("INSERT INTO poller_tips (poller, branch, revision) VALUES ($1, $2, $3)")
                .bind(poller)
                .bind(branch)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
        }
        let stored = Self::add_changes_in(&mut tx, changes, self.now_ms()).await?;
        tx.commit().await?;
        self.published(Self::new_changes(&stored));
        Ok(Some(stored))
    }

    /// Claims (or keeps) the right to poll `poller` on schedule for `lease_ms`. Returns whether
    /// this master holds it: only one master polls a repository while its lease runs.
    pub async fn claim_poller(&self, poller: &str, masterid: i64, lease_ms: i64) -> Result<bool> {
        let now = self.now_ms();
        let row = sqlx::query(
            "INSERT INTO poller_claims (poller, masterid, lease_expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (poller) DO UPDATE SET masterid = $2, lease_expires_at = $3 \
             WHERE poller_claims.masterid = $2 OR poller_claims.lease_expires_at < $4 \
             RETURNING masterid",
        )
        .bind(poller)
        .bind(masterid)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&self.write)
        .await?;
        Ok(row.is_some())
    }
}
