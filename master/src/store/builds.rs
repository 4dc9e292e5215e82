//! Builds and their steps: rows, states and results (with the reports their start and end owe).

use super::reports::NewReport;
use super::{LogTail, Result, Store, StoreError, get_i64};
use crate::domain::ClaimedRequest;
use crate::events::{Event, Topic};
use crate::properties::Properties;
use crate::results::Results;

/// A build row just created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBuild {
    pub buildid: i64,
    pub number: i64,
}

impl Store {
    /// Creates the next numbered build of a builder for a claimed request, recording its number
    /// as the `buildnumber` property too.
    pub async fn new_build(
        &self,
        builderid: i64,
        brid: i64,
        workerid: i64,
        masterid: i64,
        properties: &Properties,
        reports: &[NewReport],
    ) -> Result<NewBuild> {
        let now = self.now_ms();
        // The number is taken in the statement that inserts the row, so builds starting at once
        // on this master never compete for it; two masters may still race on PostgreSQL, where
        // the unique (builderid, number) index decides and the loser takes the next one.
        for _ in 0..20 {
            let mut tx = self.write.begin().await?;
            let row = sqlx::query(
                "INSERT INTO builds (number, builderid, buildrequestid, workerid, masterid, started_at, state_string, properties) \
                 SELECT COALESCE(MAX(number), 0) + 1, $1, $2, $3, $4, $5, 'building', '{}' FROM builds WHERE builderid = $1 \
                 ON CONFLICT (builderid, number) DO NOTHING RETURNING id, number",
            )
            .bind(builderid)
            .bind(brid)
            .bind(workerid)
            .bind(masterid)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else { continue };
            let (buildid, number) = (get_i64(&row, "id")?, get_i64(&row, "number")?);
            let mut properties = properties.clone();
            properties.set("buildnumber", serde_json::Value::from(number), "Build");
            sqlx::query("UPDATE builds SET properties = $1 WHERE id = $2")
                .bind(properties.to_json().to_string())
                .bind(buildid)
                .execute(&mut *tx)
                .await?;
            Self::insert_reports(&mut tx, buildid, reports, now).await?;
            tx.commit().await?;
            self.published(vec![
                Event::new(Topic::Builds, buildid, "new"),
                Event::new(Topic::BuildProperties, buildid, "update"),
            ]);
            return Ok(NewBuild { buildid, number });
        }
        Err(StoreError::Corrupt(format!("could not number a build of builder {builderid}")))
    }

    pub async fn set_build_state(&self, buildid: i64, state: &str) -> Result<()> {
        sqlx::query("UPDATE builds SET state_string = $1 WHERE id = $2")
            .bind(state)
            .bind(buildid)
            .execute(&self.write)
            .await?;
        self.published(vec![Event::new(Topic::Builds, buildid, "update")]);
        Ok(())
    }

    /// Finishes a build with its final properties and, in the same transaction, completes its
    /// request with the build's result — or, for RETRY, puts the request back in the queue.
    /// Returns false and changes nothing when the claim is no longer held: whoever took it back
    /// has already finished the build.
    pub async fn finish_build(
        &self,
        buildid: i64,
        results: Results,
        state: &str,
        properties: &Properties,
        claim: &ClaimedRequest,
    ) -> Result<bool> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let mut events = Vec::new();
        let mut results = results;
        let mut settled = false;
        if results == Results::Retry {
            // A retry never undoes a stop: a request someone asked to stop ends CANCELLED.
            let requeued = sqlx::query(
                "UPDATE buildrequests SET claimed_by_masterid = NULL, claimed_at = NULL, claim_token = NULL, \
                 lease_expires_at = NULL WHERE id = $1 AND claim_token = $2 AND complete = 0 AND stop_requested = 0",
            )
            .bind(claim.brid)
            .bind(claim.claim_token)
            .execute(&mut *tx)
            .await?;
            settled = requeued.rows_affected() > 0;
            if settled {
                events.push(Event::new(Topic::BuildRequests, claim.brid, "unclaimed"));
            } else {
                results = Results::Cancelled;
            }
        }
        let state = if results == Results::Cancelled { "cancelled" } else { state };
        if !settled {
            let completed = sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, lease_expires_at = NULL \
                 WHERE id = $3 AND claim_token = $4 AND complete = 0",
            )
            .bind(now)
            .bind(results.code())
            .bind(claim.brid)
            .bind(claim.claim_token)
            .execute(&mut *tx)
            .await?;
            settled = completed.rows_affected() > 0;
            events.push(Event::new(Topic::BuildRequests, claim.brid, "complete"));
        }
        if !settled {
            return Ok(false);
        }
        if results != Results::Retry {
            Self::maybe_complete_buildset(&mut tx, claim.buildsetid, now, &mut events).await?;
        }
        // The engine has finished every step it started, so only the build row changes here.
        sqlx::query(
            "UPDATE builds SET properties = $1, complete_at = $2, results = $3, state_string = $4 \
             WHERE id = $5 AND complete_at IS NULL",
        )
        .bind(properties.to_json().to_string())
        .bind(now)
        .bind(results.code())
        .bind(state)
        .bind(buildid)
        .execute(&mut *tx)
        .await?;
        Self::release_held_reports(&mut tx, buildid, results, now).await?;
        tx.commit().await?;
        // Buildbot's order: the build, then its request, then its buildset.
        events.insert(0, Event::new(Topic::BuildProperties, buildid, "update"));
        events.insert(1, Event::new(Topic::Builds, buildid, "finished"));
        self.published(events);
        Ok(true)
    }

    /// The results of the last finished build of `builderid` numbered below `number`, passing
    /// over builds that ended RETRY (their request ran again), as Buildbot's reporters look back.
    pub async fn previous_build_results(&self, builderid: i64, number: i64) -> Result<Option<Results>> {
        let row = sqlx::query(
            "SELECT results FROM builds WHERE builderid = $1 AND number < $2 AND complete_at IS NOT NULL \
             AND results IS NOT NULL AND results <> $3 ORDER BY number DESC LIMIT 1",
        )
        .bind(builderid)
        .bind(number)
        .bind(Results::Retry.code())
        .fetch_optional(&self.write)
        .await?;
        Ok(match row {
            Some(row) => Results::from_code(get_i64(&row, "results")?),
            None => None,
        })
    }

    /// Records a step that did not run. Like [`Store::begin_step`], it may be written again after
    /// a commit its caller did not hear of, and then returns the step already recorded.
    pub async fn skip_step(&self, buildid: i64, number: i64, name: &str) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO steps (number, name, buildid, complete_at, results, state_string) VALUES ($1, $2, $3, $4, $5, 'skipped') \
             ON CONFLICT (buildid, number) DO UPDATE SET number = excluded.number RETURNING id",
        )
        .bind(number)
        .bind(name)
        .bind(buildid)
        .bind(self.now_ms())
        .bind(Results::Skipped.code())
        .fetch_one(&self.write)
        .await?;
        let stepid = get_i64(&row, "id")?;
        self.published(vec![Event::new(Topic::Steps, stepid, "new"), Event::new(Topic::Steps, stepid, "finished")]);
        Ok(stepid)
    }

    /// Starts a step together with its `stdio` log; returns the step and log ids.
    ///
    /// Only the build holding its request's claim writes its steps, so a step already recorded
    /// under this build and number is this one, written by an attempt whose commit succeeded
    /// although its caller saw an error: it is returned, not recorded twice.
    pub async fn begin_step(&self, buildid: i64, number: i64, name: &str, state: &str) -> Result<(i64, i64)> {
        let mut tx = self.write.begin().await?;
        let row = sqlx::query(
            "INSERT INTO steps (number, name, buildid, started_at, state_string) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (buildid, number) DO UPDATE SET number = excluded.number RETURNING id",
        )
        .bind(number)
        .bind(name)
        .bind(buildid)
        .bind(self.now_ms())
        .bind(state)
        .fetch_one(&mut *tx)
        .await?;
        let stepid = get_i64(&row, "id")?;
        let row = sqlx::query(
            "INSERT INTO logs (name, slug, stepid, type) VALUES ('stdio', 'stdio', $1, 's') \
             ON CONFLICT (stepid, slug) DO UPDATE SET slug = excluded.slug RETURNING id",
        )
        .bind(stepid)
        .fetch_one(&mut *tx)
        .await?;
        let logid = get_i64(&row, "id")?;
        tx.commit().await?;
        self.published(vec![
            Event::new(Topic::Steps, stepid, "new"),
            Event::new(Topic::Steps, stepid, "started"),
            Event::new(Topic::Logs, logid, "new"),
        ]);
        Ok((stepid, logid))
    }

    pub async fn set_step_state(&self, stepid: i64, state: &str) -> Result<()> {
        sqlx::query("UPDATE steps SET state_string = $1 WHERE id = $2")
            .bind(state)
            .bind(stepid)
            .execute(&self.write)
            .await?;
        self.published(vec![Event::new(Topic::Steps, stepid, "updated")]);
        Ok(())
    }

    /// Finishes a step: writes the last lines of its log, closes the log and records the result,
    /// in one transaction.
    pub async fn finish_step(&self, stepid: i64, results: Results, state: &str, log: &LogTail) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let lines = Self::insert_chunk(&mut tx, log.logid, log.first_line, &log.text).await?;
        sqlx::query("UPDATE logs SET num_lines = $1, complete = 1 WHERE id = $2")
            .bind(log.first_line + lines)
            .bind(log.logid)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE steps SET complete_at = $1, results = $2, state_string = $3 WHERE id = $4")
            .bind(self.now_ms())
            .bind(results.code())
            .bind(state)
            .bind(stepid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut events = Vec::with_capacity(3);
        if lines > 0 {
            events.push(Event::new(Topic::Logs, log.logid, "append"));
        }
        events.push(Event::new(Topic::Logs, log.logid, "finished"));
        events.push(Event::new(Topic::Steps, stepid, "finished"));
        self.published(events);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Logs
}
