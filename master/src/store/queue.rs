//! The build queue: claims and their leases, stops, priorities, expiry and counts.

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Backend, Result, Store, StoreError, builder_filter, get_i64, id_array};
use crate::domain::{BuildOrigin, ClaimedRequest};
use crate::events::{Event, Topic};
use crate::results::Results;

/// What became of expired claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Requests put back in the queue.
    pub requeued: Vec<i64>,
    /// Builds finished as RETRY (or CANCELLED, for a request someone asked to stop).
    pub retried_builds: Vec<i64>,
    /// Requests someone asked to stop, completed as CANCELLED instead of re-queued.
    pub cancelled: Vec<i64>,
}

impl Store {
    /// Claims the next claimable request — highest priority first, then oldest — among
    /// `builderids` (all builders when `None`), under a lease of `lease_ms`. Several masters may
    /// call this at once: on PostgreSQL the row is locked with `FOR UPDATE SKIP LOCKED`, so each
    /// request goes to exactly one of them.
    pub async fn claim_next(
        &self,
        masterid: i64,
        builderids: Option<&[i64]>,
        lease_ms: i64,
    ) -> Result<Option<ClaimedRequest>> {
        if builderids.is_some_and(<[i64]>::is_empty) {
            return Ok(None);
        }
        let now = self.now_ms();
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let next = next_claimable_sql(self.backend, builderids, self.skip_locked());
        let sql = format!(
            "UPDATE buildrequests SET claimed_by_masterid = $1, claimed_at = $2, claim_token = $3, lease_expires_at = $4 \
             WHERE id = ({next}) AND complete = 0 AND claimed_by_masterid IS NULL \
             RETURNING id, buildsetid, builderid, priority, submitted_at"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(masterid)
            .bind(now)
            .bind(token)
            .bind(now + lease_ms)
            .fetch_optional(&self.write)
            .await?;
        let claimed = row
            .map(|row| -> Result<ClaimedRequest> {
                Ok(ClaimedRequest {
                    brid: get_i64(&row, "id")?,
                    buildsetid: get_i64(&row, "buildsetid")?,
                    builderid: get_i64(&row, "builderid")?,
                    priority: get_i64(&row, "priority")?,
                    submitted_at_ms: get_i64(&row, "submitted_at")?,
                    claim_token: token,
                })
            })
            .transpose()?;
        if let Some(claimed) = &claimed {
            self.published(vec![Event::new(Topic::BuildRequests, claimed.brid, "claimed")]);
        }
        Ok(claimed)
    }

    /// Extends the leases of the claims in `held` — the builds this process runs, by request id
    /// and claim token — and the master's heartbeat. Only these: a claim of the same master id
    /// that this process does not run (a predecessor's, after a restart under the same name)
    /// must expire and be taken back. Returns the requests whose claims are still held; a
    /// missing one was taken back.
    pub async fn renew_leases(&self, masterid: i64, held: &[(i64, i64)], lease_ms: i64) -> Result<Vec<i64>> {
        let now = self.now_ms();
        self.master_heartbeat(masterid).await?;
        let mut renewed = Vec::with_capacity(held.len());
        if held.is_empty() {
            return Ok(renewed);
        }
        let sql = format!(
            "UPDATE buildrequests SET lease_expires_at = $1 \
             WHERE claimed_by_masterid = $2 AND complete = 0 AND id {} RETURNING id, claim_token",
            self.in_ids(3)
        );
        let ids: Vec<i64> = held.iter().map(|(brid, _)| *brid).collect();
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(now + lease_ms)
            .bind(masterid)
            .bind(id_array(&ids))
            .fetch_all(&self.write)
            .await?;
        for row in rows {
            let (brid, token) = (get_i64(&row, "id")?, row.try_get::<Option<i64>, _>("claim_token")?);
            if held.iter().any(|(b, t)| *b == brid && Some(*t) == token) {
                renewed.push(brid);
            }
        }
        Ok(renewed)
    }

    /// Brings the leases of `masterid`'s claims forward to `until` (where they run later): done
    /// by a master at start, holding the instance lock of its id, so a predecessor's claims —
    /// no live process runs them — are taken back as soon as its commands are surely dead
    /// instead of a whole lease later. Returns how many claims were shortened.
    pub async fn shorten_claims(&self, masterid: i64, until: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE buildrequests SET lease_expires_at = $1 \
             WHERE claimed_by_masterid = $2 AND complete = 0 AND lease_expires_at > $1",
        )
        .bind(until)
        .bind(masterid)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    /// Whether a claim is still held with this token.
    pub async fn claim_held(&self, brid: i64, claim_token: i64) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 AS held FROM buildrequests WHERE id = $1 AND claim_token = $2 AND complete = 0")
                .bind(brid)
                .bind(claim_token)
                .fetch_optional(&self.write)
                .await?;
        Ok(row.is_some())
    }

    /// Completes a claimed request with a final result, then its buildset if all of its requests
    /// are complete. Returns false (and changes nothing) when the claim is no longer held.
    pub async fn complete_request(&self, brid: i64, claim_token: i64, results: Results) -> Result<bool> {
        debug_assert_ne!(results, Results::Retry, "RETRY re-queues; use release_request");
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let done = sqlx::query(
            "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, lease_expires_at = NULL \
             WHERE id = $3 AND claim_token = $4 AND complete = 0",
        )
        .bind(now)
        .bind(results.code())
        .bind(brid)
        .bind(claim_token)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let row =
            sqlx::query("SELECT buildsetid FROM buildrequests WHERE id = $1").bind(brid).fetch_one(&mut *tx).await?;
        let mut events = vec![Event::new(Topic::BuildRequests, brid, "complete")];
        Self::maybe_complete_buildset(&mut tx, get_i64(&row, "buildsetid")?, now, &mut events).await?;
        tx.commit().await?;
        self.published(events);
        Ok(true)
    }

    /// Puts a claimed request back in the queue, finishing any build of it still open as RETRY
    /// (a build cut short by a database failure). Returns false when the claim was no longer held.
    pub async fn release_request(&self, brid: i64, claim_token: i64) -> Result<bool> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let done = sqlx::query(
            "UPDATE buildrequests SET claimed_by_masterid = NULL, claimed_at = NULL, claim_token = NULL, \
             lease_expires_at = NULL WHERE id = $1 AND claim_token = $2 AND complete = 0",
        )
        .bind(brid)
        .bind(claim_token)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let builds = sqlx::query("SELECT id FROM builds WHERE buildrequestid = $1 AND complete_at IS NULL")
            .bind(brid)
            .fetch_all(&mut *tx)
            .await?;
        let mut events = Vec::new();
        for build in builds {
            Self::finish_open_build(&mut tx, get_i64(&build, "id")?, Results::Retry, "retry", now, &mut events).await?;
        }
        tx.commit().await?;
        events.push(Event::new(Topic::BuildRequests, brid, "unclaimed"));
        self.published(events);
        Ok(true)
    }

    /// Cancels a request nobody has claimed yet: it completes as CANCELLED. Returns false when it
    /// is claimed or already complete.
    pub async fn cancel_unclaimed(&self, brid: i64) -> Result<bool> {
        let mut tx = self.write.begin().await?;
        let Some(row) = sqlx::query("SELECT buildsetid FROM buildrequests WHERE id = $1")
            .bind(brid)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let bsid = get_i64(&row, "buildsetid")?;
        let mut events = vec![Event::new(Topic::BuildRequests, brid, "cancel")];
        let done =
            Self::complete_unclaimed(&mut tx, brid, bsid, Results::Cancelled, self.now_ms(), &mut events).await?;
        tx.commit().await?;
        if done {
            self.published(events);
        }
        Ok(done)
    }

    /// Completes a request no master has claimed with `results` (SKIPPED when collapsed,
    /// CANCELLED when cancelled), then its buildset if that was its last open request. Returns
    /// false, changing nothing, when the request is claimed or complete.
    pub(super) async fn complete_unclaimed(
        conn: &mut AnyConnection,
        brid: i64,
        bsid: i64,
        results: Results,
        now: i64,
        events: &mut Vec<Event>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2 \
             WHERE id = $3 AND complete = 0 AND claimed_by_masterid IS NULL",
        )
        .bind(now)
        .bind(results.code())
        .bind(brid)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        events.push(Event::new(Topic::BuildRequests, brid, "complete"));
        Self::maybe_complete_buildset(conn, bsid, now, events).await?;
        Ok(true)
    }

    /// Records that a request's build must stop, for whichever master runs it. Returns false when
    /// the request is already complete.
    pub async fn request_stop(&self, brid: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE buildrequests SET stop_requested = 1 WHERE id = $1 AND complete = 0")
            .bind(brid)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Requests this master holds whose builds someone asked to stop.
    pub async fn stops_requested(&self, masterid: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(STOPS_REQUESTED).bind(masterid).fetch_all(&self.write).await?;
        rows.iter().map(|r| get_i64(r, "id")).collect()
    }

    /// Changes the priority of a request still in the queue or running. Returns false when it is
    /// complete or unknown.
    pub async fn set_priority(&self, brid: i64, priority: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE buildrequests SET priority = $1 WHERE id = $2 AND complete = 0")
            .bind(priority)
            .bind(brid)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The request, builder and buildset of a build.
    pub async fn build_origin(&self, buildid: i64) -> Result<BuildOrigin> {
        let row = sqlx::query(
            "SELECT b.buildrequestid, b.builderid, r.buildsetid, r.priority, r.complete FROM builds b \
             JOIN buildrequests r ON r.id = b.buildrequestid WHERE b.id = $1",
        )
        .bind(buildid)
        .fetch_optional(&self.read)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("build {buildid}")))?;
        Ok(BuildOrigin {
            brid: get_i64(&row, "buildrequestid")?,
            builderid: get_i64(&row, "builderid")?,
            buildsetid: get_i64(&row, "buildsetid")?,
            priority: get_i64(&row, "priority")?,
            request_complete: get_i64(&row, "complete")? != 0,
        })
    }

    /// Whether a request exists and is complete.
    pub async fn request_complete(&self, brid: i64) -> Result<bool> {
        let row = sqlx::query("SELECT complete FROM buildrequests WHERE id = $1")
            .bind(brid)
            .fetch_optional(&self.read)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build request {brid}")))?;
        Ok(get_i64(&row, "complete")? != 0)
    }

    /// Takes back every claim whose lease has expired (its master vanished or stalled): the
    /// builds running under it finish as RETRY and the requests return to the queue.
    pub async fn reap_expired_claims(&self) -> Result<Reaped> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let lock = self.skip_locked();
        let mut rows = sqlx::query(AssertSqlSafe(expired_claims_sql(lock))).bind(now).fetch_all(&mut *tx).await?;
        rows.sort_by_key(|row| get_i64(row, "id").unwrap_or_default());
        let mut reaped = Reaped::default();
        let mut events = Vec::new();
        for row in rows {
            let brid = get_i64(&row, "id")?;
            // A stop asked of a build whose master is gone takes effect here: the request ends
            // CANCELLED instead of returning to the queue.
            let stopped = get_i64(&row, "stop_requested")? != 0;
            let (results, state) =
                if stopped { (Results::Cancelled, "cancelled") } else { (Results::Retry, "retry: lease expired") };
            let builds = sqlx::query("SELECT id FROM builds WHERE buildrequestid = $1 AND complete_at IS NULL")
                .bind(brid)
                .fetch_all(&mut *tx)
                .await?;
            for build in builds {
                let buildid = get_i64(&build, "id")?;
                Self::finish_open_build(&mut tx, buildid, results, state, now, &mut events).await?;
                reaped.retried_builds.push(buildid);
            }
            if stopped {
                sqlx::query(
                    "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, lease_expires_at = NULL \
                     WHERE id = $3",
                )
                .bind(now)
                .bind(Results::Cancelled.code())
                .bind(brid)
                .execute(&mut *tx)
                .await?;
                events.push(Event::new(Topic::BuildRequests, brid, "complete"));
                Self::maybe_complete_buildset(&mut tx, get_i64(&row, "buildsetid")?, now, &mut events).await?;
                reaped.cancelled.push(brid);
                continue;
            }
            sqlx::query(
                "UPDATE buildrequests SET claimed_by_masterid = NULL, claimed_at = NULL, claim_token = NULL, \
                 lease_expires_at = NULL WHERE id = $1",
            )
            .bind(brid)
            .execute(&mut *tx)
            .await?;
            events.push(Event::new(Topic::BuildRequests, brid, "unclaimed"));
            reaped.requeued.push(brid);
        }
        tx.commit().await?;
        self.published(events);
        Ok(reaped)
    }

    pub(super) async fn finish_open_build(
        conn: &mut sqlx::AnyConnection,
        buildid: i64,
        results: Results,
        state: &str,
        now: i64,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let steps = sqlx::query(
            "UPDATE steps SET complete_at = $1, results = $2, state_string = state_string || ' (interrupted)' \
             WHERE buildid = $3 AND complete_at IS NULL AND started_at IS NOT NULL RETURNING id",
        )
        .bind(now)
        .bind(results.code())
        .bind(buildid)
        .fetch_all(&mut *conn)
        .await?;
        let logs = sqlx::query(
            "UPDATE logs SET complete = 1 WHERE complete = 0 AND stepid IN (SELECT id FROM steps WHERE buildid = $1) \
             RETURNING id",
        )
        .bind(buildid)
        .fetch_all(&mut *conn)
        .await?;
        for log in &logs {
            events.push(Event::new(Topic::Logs, get_i64(log, "id")?, "finished"));
        }
        for step in &steps {
            events.push(Event::new(Topic::Steps, get_i64(step, "id")?, "finished"));
        }
        events.push(Event::new(Topic::Builds, buildid, "finished"));
        sqlx::query(
            "UPDATE builds SET complete_at = $1, results = $2, state_string = $3 WHERE id = $4 AND complete_at IS NULL",
        )
        .bind(now)
        .bind(results.code())
        .bind(state)
        .bind(buildid)
        .execute(&mut *conn)
        .await?;
        Self::release_held_reports(conn, buildid, results, now).await
    }

    /// Claimable requests per builder, and the submission time of the oldest one.
    pub async fn pending_by_builder(&self) -> Result<(Vec<(String, i64)>, Option<i64>)> {
        let rows = sqlx::query(
            "SELECT b.name, COUNT(r.id) AS n, MIN(r.submitted_at) AS oldest FROM builders b \
             LEFT JOIN buildrequests r ON r.builderid = b.id AND r.complete = 0 AND r.claimed_by_masterid IS NULL \
             GROUP BY b.name ORDER BY b.name",
        )
        .fetch_all(&self.read)
        .await?;
        let mut oldest: Option<i64> = None;
        let mut counts = Vec::with_capacity(rows.len());
        for row in &rows {
            counts.push((row.try_get::<String, _>("name")?, get_i64(row, "n")?));
            if let Some(at) = row.try_get::<Option<i64>, _>("oldest")? {
                oldest = Some(oldest.map_or(at, |o: i64| o.min(at)));
            }
        }
        Ok((counts, oldest))
    }

    /// Counts requests waiting to be claimed.
    pub async fn pending_count(&self) -> Result<i64> {
        Ok(self.queue_counts(None).await?.0)
    }

    /// Requests of some builders (`None`: all) waiting to be claimed, and claimed (being built).
    pub async fn queue_counts(&self, builderids: Option<&[i64]>) -> Result<(i64, i64)> {
        if builderids.is_some_and(<[i64]>::is_empty) {
            return Ok((0, 0));
        }
        let row = sqlx::query(AssertSqlSafe(queue_counts_sql(builderids))).fetch_one(&self.read).await?;
        Ok((get_i64(&row, "pending")?, get_i64(&row, "claimed")?))
    }
}

/// The open requests claimed by the master `$1` whose builds someone asked to stop.
const STOPS_REQUESTED: &str =
    "SELECT id FROM buildrequests WHERE claimed_by_masterid = $1 AND complete = 0 AND stop_requested = 1";

/// The id of the next claimable request of some builders (`None`: all): highest priority, then
/// oldest. Each read walks an index in that order and stops at the first row — never sorting the
/// queue, which a deep one would make slow. On SQLite (one writer, no row locks) several builders
/// are one such walk each and the best of their firsts; PostgreSQL, which cannot lock the rows of
/// a union, gets one statement and plans it from its statistics.
fn next_claimable_sql(backend: Backend, builderids: Option<&[i64]>, lock: &str) -> String {
    const UNION_BUILDERS: usize = 100;
    const CLAIMABLE: &str = "FROM buildrequests WHERE complete = 0 AND claimed_by_masterid IS NULL";
    const ORDER: &str = "ORDER BY priority DESC, submitted_at, id LIMIT 1";
    match (backend, builderids) {
        // SQLite allows 500 terms in a compound statement; a worker serving more builders than
        // the bound gets the one statement (its claim sorts those builders' requests).
        (Backend::Sqlite, Some(ids)) if ids.len() > 1 && ids.len() <= UNION_BUILDERS => {
            let firsts: Vec<String> = ids
                .iter()
                .map(|id| {
                    format!(
                        "SELECT * FROM (SELECT id, priority, submitted_at {CLAIMABLE} AND builderid = {id} {ORDER})"
                    )
                })
                .collect();
            format!("SELECT id FROM ({}) {ORDER}", firsts.join(" UNION ALL "))
        }
        (_, ids) => format!("SELECT id {CLAIMABLE} {} {ORDER} {lock}", builder_filter(ids)),
    }
}

/// Counts the open requests of some builders (`None`: all), pending and claimed.
fn queue_counts_sql(builderids: Option<&[i64]>) -> String {
    format!(
        "SELECT COALESCE(SUM(CASE WHEN claimed_by_masterid IS NULL THEN 1 ELSE 0 END), 0) AS pending, \
                COALESCE(SUM(CASE WHEN claimed_by_masterid IS NULL THEN 0 ELSE 1 END), 0) AS claimed \
         FROM buildrequests WHERE complete = 0 {}",
        builder_filter(builderids)
    )
}

/// The claimed open requests whose lease expired before `$1`. No ORDER BY: with one, SQLite
/// scans every request ever made in id order instead of searching the index of the claimed
/// open ones; the caller sorts them.
fn expired_claims_sql(lock: &str) -> String {
    format!(
        "SELECT id, buildsetid, stop_requested FROM buildrequests WHERE complete = 0 \
         AND claimed_by_masterid IS NOT NULL AND lease_expires_at < $1 {lock}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reads made on every dispatch round or housekeeping round search indexes of the open
    /// requests, so their cost follows the queue, not the history.
    #[tokio::test]
    async fn the_queue_is_read_without_scanning_every_request_ever_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("kiln.sqlite").display())).await.unwrap();
        let statements = [
            queue_counts_sql(None),
            queue_counts_sql(Some(&[1, 2])),
            expired_claims_sql(""),
            STOPS_REQUESTED.to_owned(),
        ];
        for sql in statements {
            let plan = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                .bind(1_i64)
                .fetch_all(&store.read)
                .await
                .unwrap();
            let details: Vec<String> = plan.iter().map(|row| row.try_get::<String, _>("detail").unwrap()).collect();
            assert!(
                details.iter().all(|d| !d.contains("buildrequests") || d.contains("USING")),
                "{sql}\nreads the whole table: {details:?}"
            );
        }
    }

    /// A claim walks an index in claim order and stops at the first row, for one builder, for
    /// several and for all: it never sorts the claimable requests. Past the bound of a union,
    /// one statement still claims.
    #[tokio::test]
    async fn a_claim_reads_the_queue_in_claim_order_without_sorting_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("kiln.sqlite").display())).await.unwrap();
        for builders in [None, Some(&[1_i64][..]), Some(&[1, 2, 3][..])] {
            let sql = next_claimable_sql(Backend::Sqlite, builders, "");
            let plan =
                sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}"))).fetch_all(&store.read).await.unwrap();
            let details: Vec<String> = plan.iter().map(|row| row.try_get::<String, _>("detail").unwrap()).collect();
            let walks = details.iter().filter(|d| d.contains("buildrequests_claimable")).count();
            assert_eq!(walks, builders.map_or(1, <[i64]>::len), "{sql}\n{details:?}");
            // Only the union's few firsts may be sorted, never the requests.
            let sorts = details.iter().filter(|d| d.contains("TEMP B-TREE")).count();
            assert_eq!(sorts, usize::from(builders.is_some_and(|b| b.len() > 1)), "{sql}\n{details:?}");
        }
        let master = store.register_master("m").await.unwrap();
        let many: Vec<i64> = (1..=600).collect();
        assert!(store.claim_next(master, Some(&many), 60_000).await.unwrap().is_none(), "a worker of 600 builders");
    }
}
