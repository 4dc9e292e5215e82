//! The reporters' outbox: reports owed for builds, written with the builds' state changes,
//! claimed by one master at a time, settled or retried.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Result, Store, StoreError, get_i64};
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
    /// and the source stamps of their buildsets, in two statements for the lot. A build not
    /// found is left out.
    pub async fn reported_builds(&self, buildids: &[i64]) -> Result<HashMap<i64, ReportedBuild>> {
        let mut builds = HashMap::new();
        let mut conn = self.read.acquire().await?;
        // Ids are integers formatted here, never caller text; a claim is a few dozen.
        for chunk in buildids.chunks(500) {
            let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT b.id, b.builderid, r.name, b.number, b.results, b.state_string, b.properties, q.buildsetid \
                 FROM builds b JOIN builders r ON r.id = b.builderid JOIN buildrequests q ON q.id = b.buildrequestid \
                 WHERE b.id IN ({list})"
            )))
            .fetch_all(&mut *conn)
            .await?;
            let mut stamps: HashMap<i64, Vec<SourceStamp>> = HashMap::new();
            let buildsets: Vec<i64> = rows.iter().map(|row| get_i64(row, "buildsetid")).collect::<Result<_>>()?;
            if !buildsets.is_empty() {
                let list = buildsets.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT bs.buildsetid, s.branch, s.revision, s.repository, s.project, s.codebase \
                     FROM buildset_sourcestamps bs JOIN sourcestamps s ON s.id = bs.sourcestampid \
                     WHERE bs.buildsetid IN ({list}) ORDER BY bs.buildsetid, s.codebase"
                )))
                .fetch_all(&mut *conn)
                .await?;
                for s in &rows {
                    stamps.entry(get_i64(s, "buildsetid")?).or_default().push(SourceStamp {
                        branch: s.try_get("branch")?,
                        revision: s.try_get("revision")?,
                        repository: s.try_get("repository")?,
                        project: s.try_get::<Option<String>, _>("project")?.unwrap_or_default(),
                        codebase: s.try_get::<Option<String>, _>("codebase")?.unwrap_or_default(),
                    });
                }
            }
            for row in &rows {
                let properties: String = row.try_get("properties")?;
                let properties = serde_json::from_str(&properties).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let buildsetid = get_i64(row, "buildsetid")?;
                let build = ReportedBuild {
                    builderid: get_i64(row, "builderid")?,
                    builder: row.try_get("name")?,
                    number: get_i64(row, "number")?,
                    results: row.try_get::<Option<i64>, _>("results")?.and_then(Results::from_code),
                    state_string: row.try_get("state_string")?,
                    properties: Properties::from_json(&properties),
                    buildsetid,
                    sourcestamps: stamps.get(&buildsetid).cloned().unwrap_or_default(),
                };
                builds.insert(get_i64(row, "id")?, build);
            }
        }
        Ok(builds)
    }

    /// Claims up to `limit` reports that are due, for `lease_ms`: pending, not claimed by a live
    /// claim, and first of their order key (an earlier report with the same key, still pending,
    /// holds the later ones back). On PostgreSQL, rows another master is claiming are skipped.
    pub async fn claim_reports(&self, masterid: i64, lease_ms: i64, limit: i64) -> Result<Vec<ClaimedReport>> {
        let now = self.now_ms();
        let lock = self.skip_locked();
        let sql = format!(
            "UPDATE reports SET claimed_by_masterid = $1, claim_expires_at = $2 WHERE id IN ( \
               SELECT r.id FROM reports r WHERE r.state = 'pending' AND r.next_attempt_at <= $3 \
                 AND (r.claim_expires_at IS NULL OR r.claim_expires_at < $3) \
                 AND NOT EXISTS (SELECT 1 FROM reports e WHERE e.order_key = r.order_key AND e.state = 'pending' AND e.id < r.id) \
               ORDER BY r.id LIMIT $4 {lock}) \
             AND state = 'pending' \
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
        let now = self.now_ms();
        let mut settled = 0;
        // Ids are integers formatted here, never caller text; a batch is a few dozen.
        for chunk in ids.chunks(500) {
            let list = chunk.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
            let sql = format!(
                "UPDATE reports SET state = 'sent', settled_at = $1, last_answer = 'sent', attempts = attempts + 1, \
                 claimed_by_masterid = NULL, claim_expires_at = NULL \
                 WHERE id IN ({list}) AND claimed_by_masterid = $2 AND state = 'pending'"
            );
            let done = sqlx::query(AssertSqlSafe(sql)).bind(now).bind(masterid).execute(&self.write).await?;
            settled += done.rows_affected();
        }
        Ok(settled)
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
            "UPDATE reports SET claimed_by_masterid = NULL, claim_expires_at = NULL              WHERE claimed_by_masterid = $1 AND state = 'pending'",
        )
        .bind(masterid)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    /// The soonest time (ms) a pending report is due, if any is pending.
    pub async fn next_report_due(&self) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT MIN(next_attempt_at) AS due FROM reports WHERE state = 'pending'")
            .fetch_one(&self.write)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("due")?)
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

    /// Counts of reports by state, for the reports view and tests.
    pub async fn report_counts(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM reports GROUP BY state ORDER BY state")
            .fetch_all(&self.write)
            .await?;
        rows.iter().map(|r| Ok((r.try_get("state")?, get_i64(r, "n")?))).collect()
    }
}
