//! The reporters' outbox: reports owed for builds, written with the builds' state changes,
//! claimed by one master at a time, settled or retried.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Result, Store, StoreError, get_i64, id_array};
use crate::domain::SourceStamp;
use crate::properties::Properties;
use crate::results::Results;

/// A report a build's start or end owes a reporter. All of a build's reports are written when
/// it starts; those of its end are held until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewReport {
    pub reporter: String,
    /// Reports with the same key go out in the order they were written.
    pub order_key: String,
    pub event: ReportEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportEvent {
    Started,
    Finished,
}

/// What a commit status or comment says of a build, read in two statements.
#[derive(Debug, Clone)]
pub struct ReportedBuild {
    pub builderid: i64,
    pub builder: String,
    pub number: i64,
    pub results: Option<Results>,
    pub state_string: String,
    pub properties: Properties,
    pub buildsetid: i64,
    pub sourcestamps: Vec<SourceStamp>,
}

/// A claimed report, to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedReport {
    pub id: i64,
    pub reporter: String,
    pub buildid: i64,
    /// `started` or `finished`.
    pub event: String,
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// How a report was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Sent,
    /// The reporter's modes do not report this build's result.
    Skipped,
    /// The forge refused it for good (bad credentials, no such repository).
    Failed,
    /// Retried until it was too old.
    Abandoned,
}

impl Settled {
    fn word(self) -> &'static str {
        match self {
            Settled::Sent => "sent",
            Settled::Skipped => "skipped",
            Settled::Failed => "failed",
            Settled::Abandoned => "abandoned",
        }
    }
}

impl Store {
    /// Writes a starting build's `reports` inside the caller's transaction, in one statement:
    /// those of its start due now, those of its end held until it ends (whoever ends it: its
    /// master, or another taking back a dead master's claim).
    pub(super) async fn insert_reports(
        conn: &mut sqlx::AnyConnection,
        buildid: i64,
        reports: &[NewReport],
        now: i64,
    ) -> Result<()> {
        // A build owes a few reports, one or two per reporter: a statement of that many rows.
        for chunk in reports.chunks(100) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("(${}, $1, ${}, ${}, ${}, $2, $2)", 3 + 4 * i, 4 + 4 * i, 5 + 4 * i, 6 + 4 * i))
                .collect();
            let sql = format!(
                "INSERT INTO reports (reporter, buildid, event, order_key, state, next_attempt_at, created_at) VALUES {}",
                rows.join(", ")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(buildid).bind(now);
            for report in chunk {
                let (event, state) = match report.event {
                    ReportEvent::Started => ("started", "pending"),
                    ReportEvent::Finished => ("finished", "held"),
                };
                query = query.bind(&report.reporter).bind(event).bind(&report.order_key).bind(state);
            }
            query.execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Inside the transaction that ends `buildid` with `results`: makes the reports of its end
    /// due — or, for RETRY, drops them, as the request runs again and its next build reports.
    pub(super) async fn release_held_reports(
        conn: &mut sqlx::AnyConnection,
        buildid: i64,
        results: Results,
        now: i64,
    ) -> Result<()> {
        let query = if results == Results::Retry {
            sqlx::query("DELETE FROM reports WHERE buildid = $1 AND state = 'held'").bind(buildid)
        } else {
            sqlx::query(
                "UPDATE reports SET state = 'pending', next_attempt_at = $2, created_at = $2 \
                 WHERE buildid = $1 AND state = 'held'",
            )
            .bind(buildid)
            .bind(now)
        };
        query.execute(&mut *conn).await?;
        Ok(())
    }

    /// The builds `buildids` as their reports describe them: builder, number, result, properties
    /// and the source stamps of their buildsets, in one statement for the lot (a row per source
    /// stamp). A build not found is left out.
    pub async fn reported_builds(&self, buildids: &[i64]) -> Result<HashMap<i64, ReportedBuild>> {
        let mut builds: HashMap<i64, ReportedBuild> = HashMap::new();
        if buildids.is_empty() {
            return Ok(builds);
        }
        let sql = format!(
            "SELECT b.id, b.builderid, r.name, b.number, b.results, b.state_string, b.properties, q.buildsetid, \
                    s.id AS ssid, s.branch, s.revision, s.repository, s.project, s.codebase \
             FROM builds b JOIN builders r ON r.id = b.builderid JOIN buildrequests q ON q.id = b.buildrequestid \
             LEFT JOIN buildset_sourcestamps bs ON bs.buildsetid = q.buildsetid \
             LEFT JOIN sourcestamps s ON s.id = bs.sourcestampid \
             WHERE b.id {} ORDER BY b.id, s.codebase",
            self.in_ids(1)
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(id_array(buildids)).fetch_all(&self.read).await?;
        for row in &rows {
            let id = get_i64(row, "id")?;
            let build = match builds.entry(id) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    let properties: String = row.try_get("properties")?;
                    let properties =
                        serde_json::from_str(&properties).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    entry.insert(ReportedBuild {
                        builderid: get_i64(row, "builderid")?,
                        builder: row.try_get("name")?,
                        number: get_i64(row, "number")?,
                        results: row.try_get::<Option<i64>, _>("results")?.and_then(Results::from_code),
                        state_string: row.try_get("state_string")?,
                        properties: Properties::from_json(&properties),
                        buildsetid: get_i64(row, "buildsetid")?,
                        sourcestamps: Vec::new(),
                    })
                }
            };
            // A buildset without source stamps gives one row of nulls.
            if row.try_get::<Option<i64>, _>("ssid")?.is_some() {
                build.sourcestamps.push(SourceStamp {
                    branch: row.try_get("branch")?,
                    revision: row.try_get("revision")?,
                    repository: row.try_get("repository")?,
                    project: row.try_get::<Option<String>, _>("project")?.unwrap_or_default(),
                    codebase: row.try_get::<Option<String>, _>("codebase")?.unwrap_or_default(),
                });
            }
        }
        Ok(builds)
    }

    /// Claims up to `limit` reports that are due, for `lease_ms`: pending, unclaimed, and first
    /// of their order key (an earlier report with the same key, still pending, holds the later
    /// ones back). Reports being sent are not read at all; a claim that lapsed (its master died
    /// mid-send) is freed by [`Store::release_expired_report_claims`]. On PostgreSQL, rows
    /// another master is claiming are skipped.
    pub async fn claim_reports(&self, masterid: i64, lease_ms: i64, limit: i64) -> Result<Vec<ClaimedReport>> {
        let now = self.now_ms();
        let lock = self.skip_locked();
        let sql = format!(
            "UPDATE reports SET claimed_by_masterid = $1, claim_expires_at = $2 WHERE id IN ( \
               SELECT r.id FROM reports r WHERE r.state = 'pending' AND r.claimed_by_masterid IS NULL \
                 AND r.next_attempt_at <= $3 \
                 AND NOT EXISTS (SELECT 1 FROM reports e WHERE e.order_key = r.order_key AND e.state = 'pending' AND e.id < r.id) \
               ORDER BY r.id LIMIT $4 {lock}) \
             AND state = 'pending' AND claimed_by_masterid IS NULL \
             RETURNING id, reporter, buildid, event, attempts, created_at"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(masterid)
            .bind(now + lease_ms)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.write)
            .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                Ok(ClaimedReport {
                    id: get_i64(row, "id")?,
                    reporter: row.try_get("reporter")?,
                    buildid: get_i64(row, "buildid")?,
                    event: row.try_get("event")?,
                    attempts: get_i64(row, "attempts")?,
                    created_at_ms: get_i64(row, "created_at")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        claimed.sort_by_key(|r| r.id);
        Ok(claimed)
    }

    /// Settles a report this master claimed; false when its claim was lost meanwhile.
    pub async fn settle_report(&self, id: i64, masterid: i64, how: Settled, answer: &str) -> Result<bool> {
        let now = self.now_ms();
        let done = sqlx::query(
            "UPDATE reports SET state = $1, settled_at = $2, last_answer = $3, attempts = attempts + 1, \
             claimed_by_masterid = NULL, claim_expires_at = NULL WHERE id = $4 AND claimed_by_masterid = $5 AND state = 'pending'",
        )
        .bind(how.word())
        .bind(now)
        .bind(answer)
        .bind(id)
        .bind(masterid)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Settles reports this master claimed and sent, in one statement; returns how many it
    /// still held.
    pub async fn settle_reports_sent(&self, ids: &[i64], masterid: i64) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "UPDATE reports SET state = 'sent', settled_at = $1, last_answer = 'sent', attempts = attempts + 1, \
             claimed_by_masterid = NULL, claim_expires_at = NULL \
             WHERE id {} AND claimed_by_masterid = $2 AND state = 'pending'",
            self.in_ids(3)
        );
        let done = sqlx::query(AssertSqlSafe(sql))
            .bind(self.now_ms())
            .bind(masterid)
            .bind(id_array(ids))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }

    /// Deletes up to `limit` reports settled before `before` (ms), the oldest first; returns how
    /// many. Reports still owed are never deleted.
    pub async fn forget_reports_settled_before(&self, before: i64, limit: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM reports WHERE id IN \
             (SELECT id FROM reports WHERE settled_at < $1 ORDER BY settled_at LIMIT $2)",
        )
        .bind(before)
        .bind(limit)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    /// Puts a claimed report back for another attempt at `next_attempt_at` (ms).
    pub async fn retry_report(&self, id: i64, masterid: i64, next_attempt_at: i64, answer: &str) -> Result<()> {
        sqlx::query(
            "UPDATE reports SET attempts = attempts + 1, next_attempt_at = $1, last_answer = $2, \
             claimed_by_masterid = NULL, claim_expires_at = NULL WHERE id = $3 AND claimed_by_masterid = $4 AND state = 'pending'",
        )
        .bind(next_attempt_at)
        .bind(answer)
        .bind(id)
        .bind(masterid)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Frees the claims `masterid` holds on reports (a previous run's, when this run holds the
    /// id's instance lock); returns how many.
    pub async fn release_report_claims(&self, masterid: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE reports SET claimed_by_masterid = NULL, claim_expires_at = NULL \
             WHERE claimed_by_masterid = $1 AND state = 'pending'",
        )
        .bind(masterid)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    /// Frees the claims that lapsed (their master died or froze while sending), so that the
    /// reports are claimed again; returns how many.
    pub async fn release_expired_report_claims(&self) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE reports SET claimed_by_masterid = NULL, claim_expires_at = NULL \
             WHERE state = 'pending' AND claimed_by_masterid IS NOT NULL AND claim_expires_at < $1",
        )
        .bind(self.now_ms())
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    /// The newest `limit` reports, optionally in one state, newest first, as the reports view
    /// shows them.
    pub async fn list_reports(&self, state: Option<&str>, limit: i64) -> Result<Vec<serde_json::Value>> {
        let rows = sqlx::query(
            "SELECT id, reporter, buildid, event, state, attempts, next_attempt_at, last_answer, created_at, settled_at              FROM reports WHERE ($1 = '' OR state = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(state.unwrap_or(""))
        .bind(limit)
        .fetch_all(&self.write)
        .await?;
        rows.iter()
            .map(|r| {
                let seconds = |ms: Option<i64>| ms.map(|ms| ms / 1000);
                Ok(serde_json::json!({
                    "reportid": get_i64(r, "id")?,
                    "reporter": r.try_get::<String, _>("reporter")?,
                    "buildid": get_i64(r, "buildid")?,
                    "event": r.try_get::<String, _>("event")?,
                    "state": r.try_get::<String, _>("state")?,
                    "attempts": get_i64(r, "attempts")?,
                    "next_attempt_at": seconds(Some(get_i64(r, "next_attempt_at")?)),
                    "last_answer": r.try_get::<Option<String>, _>("last_answer")?,
                    "created_at": seconds(Some(get_i64(r, "created_at")?)),
                    "settled_at": seconds(r.try_get::<Option<i64>, _>("settled_at")?),
                }))
            })
            .collect()
    }
}
