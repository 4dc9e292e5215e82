//! Buildsets and their requests: submission with collapsing, completion and details.

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Result, Store, StoreError, get_i64};
use crate::collapse::CollapseView;
use crate::domain::{BuildsetDetails, CompletedBuildset, NewBuildset, SourceStamp, Submitted, SubmittedRequest};
use crate::events::{Event, Topic};
use crate::properties::Properties;
use crate::results::Results;

impl Store {
    /// Stores a buildset and one build request per builder, atomically, collapsing older
    /// compatible requests of the builders in `collapse_builderids` (they complete as SKIPPED).
    pub async fn add_buildset(&self, buildset: &NewBuildset) -> Result<Submitted> {
        match self.store_buildset(buildset, None).await? {
            Some(submitted) => Ok(submitted),
            None => unreachable!("only a scheduler that acted on a change before stores nothing"),
        }
    }

    /// [`Store::add_buildset`] for a scheduler acting on a change, in one transaction with the
    /// record that it acted; `None` (and nothing stored) when it acted on that change before.
    pub async fn add_buildset_for_change(
        &self,
        buildset: &NewBuildset,
        changeid: i64,
        scheduler: &str,
    ) -> Result<Option<Submitted>> {
        self.store_buildset(buildset, Some((changeid, scheduler))).await
    }

    async fn store_buildset(&self, buildset: &NewBuildset, acting: Option<(i64, &str)>) -> Result<Option<Submitted>> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        if let Some((changeid, scheduler)) = acting
            && !Self::acting_on(&mut tx, changeid, scheduler, now).await?
        {
            return Ok(None);
        }
        let mut collapsed = 0;
        let mut events = Vec::new();
        let submitted = Self::add_buildset_in(&mut tx, buildset, now, &mut collapsed, &mut events).await?;
        tx.commit().await?;
        self.published(events);
        crate::telemetry::requests_collapsed(collapsed);
        Ok(Some(submitted))
    }

    /// [`Store::add_buildset`] inside a transaction; adds the number of requests it collapsed
    /// to `collapsed`, for the caller to count once the transaction commits.
    pub(super) async fn add_buildset_in(
        tx: &mut AnyConnection,
        buildset: &NewBuildset,
        now: i64,
        collapsed: &mut u64,
        events: &mut Vec<Event>,
    ) -> Result<Submitted> {
        let row = sqlx::query(
            "INSERT INTO buildsets (external_idstring, reason, submitted_at, properties, rebuilt_buildid, parent_buildid, \
             parent_relationship) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(buildset.external_idstring.clone())
        .bind(&buildset.reason)
        .bind(now)
        .bind(buildset.properties.to_json().to_string())
        .bind(buildset.rebuilt_buildid)
        .bind(buildset.parent_buildid)
        .bind(buildset.parent_relationship.clone())
        .fetch_one(&mut *tx)
        .await?;
        let bsid = get_i64(&row, "id")?;
        events.push(Event::new(Topic::Buildsets, bsid, "new"));
        let collapse_key = crate::collapse::key(&buildset.sourcestamps);
        let mut view = CollapseView { sourcestamps: Vec::new(), properties: buildset.properties.clone() };
        for ss in &buildset.sourcestamps {
            let ssid = Self::find_or_create_sourcestamp(tx, ss, now).await?;
            if !buildset.collapse_builderids.is_empty() {
                let changes = sqlx::query("SELECT 1 AS found FROM changes WHERE sourcestampid = $1 LIMIT 1")
                    .bind(ssid)
                    .fetch_optional(&mut *tx)
                    .await?;
                view.sourcestamps.push((ss.clone(), changes.is_some()));
            }
            sqlx::query(
                "INSERT INTO buildset_sourcestamps (buildsetid, sourcestampid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(bsid)
            .bind(ssid)
            .execute(&mut *tx)
            .await?;
        }
        let mut requests = Vec::with_capacity(buildset.builderids.len());
        for &builderid in &buildset.builderids {
            let row = sqlx::query(
                "INSERT INTO buildrequests (buildsetid, builderid, priority, submitted_at, collapse_key, waited_for) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(bsid)
            .bind(builderid)
            .bind(buildset.priority)
            .bind(now)
            .bind(&collapse_key)
            .bind(i64::from(buildset.waited_for))
            .fetch_one(&mut *tx)
            .await?;
            let brid = get_i64(&row, "id")?;
            events.push(Event::new(Topic::BuildRequests, brid, "new"));
            requests.push(SubmittedRequest { builderid, brid });
            if buildset.collapse_builderids.contains(&builderid) {
                *collapsed += Self::collapse_older(tx, builderid, brid, &collapse_key, &view, now, events).await?;
            }
        }
        Ok(Submitted { bsid, requests })
    }

    /// Completes as SKIPPED the unclaimed requests of `builderid` older than `brid` that the new
    /// buildset makes redundant; returns how many.
    pub(super) async fn collapse_older(
        conn: &mut AnyConnection,
        builderid: i64,
        brid: i64,
        key: &str,
        new: &CollapseView,
        now: i64,
        events: &mut Vec<Event>,
    ) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT r.id, r.buildsetid, b.properties, s.id AS ssid, s.branch, s.revision, s.repository, s.project, s.codebase, \
             CAST(CASE WHEN EXISTS (SELECT 1 FROM changes c WHERE c.sourcestampid = s.id) THEN 1 ELSE 0 END AS BIGINT) AS has_changes \
             FROM buildrequests r JOIN buildsets b ON b.id = r.buildsetid \
             LEFT JOIN buildset_sourcestamps bs ON bs.buildsetid = r.buildsetid \
             LEFT JOIN sourcestamps s ON s.id = bs.sourcestampid \
             WHERE r.builderid = $1 AND r.collapse_key = $3 AND r.complete = 0 AND r.claimed_by_masterid IS NULL \
             AND r.id < $2 ORDER BY r.id",
        )
        .bind(builderid)
        .bind(brid)
        .bind(key)
        .fetch_all(&mut *conn)
        .await?;
        let mut candidates: Vec<(i64, i64, CollapseView)> = Vec::new();
        for row in &rows {
            let id = get_i64(row, "id")?;
            if candidates.last().is_none_or(|(last, _, _)| *last != id) {
                let props: String = row.try_get("properties")?;
                let props = serde_json::from_str(&props).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let view = CollapseView { sourcestamps: Vec::new(), properties: Properties::from_json(&props) };
                candidates.push((id, get_i64(row, "buildsetid")?, view));
            }
            if row.try_get::<Option<i64>, _>("ssid")?.is_some() {
                let has_changes = get_i64(row, "has_changes")? != 0;
                let ss = SourceStamp {
                    branch: row.try_get("branch")?,
                    revision: row.try_get("revision")?,
                    repository: row.try_get::<Option<String>, _>("repository")?.unwrap_or_default(),
                    project: row.try_get::<Option<String>, _>("project")?.unwrap_or_default(),
                    codebase: row.try_get::<Option<String>, _>("codebase")?.unwrap_or_default(),
                };
                candidates.last_mut().expect("pushed above").2.sourcestamps.push((ss, has_changes));
            }
        }
        let mut count = 0;
        for (old, bsid, view) in candidates {
            if !crate::collapse::can_collapse(new, &view) {
                continue;
            }
            if Self::complete_unclaimed(conn, old, bsid, Results::Skipped, now, events).await? {
                tracing::info!(collapsed = old, into = brid, "collapsing a build request");
                count += 1;
            }
        }
        Ok(count)
    }

    /// Takes up to `limit` completed buildsets from the outbox and, in the same transaction,
    /// submits the buildsets `react` asks for in response (e.g. Dependent schedulers'). Several
    /// masters may call this at once; each completion is taken by one. Returns how many were
    /// taken and the buildsets submitted.
    pub async fn take_completed_buildsets(
        &self,
        limit: i64,
        react: impl Fn(&CompletedBuildset) -> Vec<NewBuildset>,
    ) -> Result<(usize, Vec<Submitted>)> {
        let lock = self.skip_locked();
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT bsid, results FROM completed_buildsets ORDER BY bsid LIMIT {} {lock}",
            limit.max(1)
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut submitted = Vec::new();
        let mut collapsed = 0;
        let mut events = Vec::new();
        for row in &rows {
            let bsid = get_i64(row, "bsid")?;
            let results = Results::from_code(get_i64(row, "results")?).unwrap_or(Results::Exception);
            let details = Self::buildset_details_in(&mut tx, bsid).await?;
            let completed = CompletedBuildset { bsid, results, details };
            for buildset in react(&completed) {
                submitted.push(Self::add_buildset_in(&mut tx, &buildset, now, &mut collapsed, &mut events).await?);
            }
            sqlx::query("DELETE FROM completed_buildsets WHERE bsid = $1").bind(bsid).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.published(events);
        crate::telemetry::requests_collapsed(collapsed);
        Ok((rows.len(), submitted))
    }

    /// The results of buildsets, `None` for those not complete yet.
    pub async fn buildset_results(&self, bsids: &[i64]) -> Result<Vec<Option<Results>>> {
        let mut results = Vec::with_capacity(bsids.len());
        for bsid in bsids {
            let row = sqlx::query("SELECT complete, results FROM buildsets WHERE id = $1")
                .bind(bsid)
                .fetch_optional(&self.read)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("buildset {bsid}")))?;
            let complete = get_i64(&row, "complete")? != 0;
            results.push(
                complete
                    .then(|| Results::from_code(get_i64(&row, "results").unwrap_or(4)).unwrap_or(Results::Exception)),
            );
        }
        Ok(results)
    }

    /// Reason, properties and source stamps of a buildset.
    pub async fn buildset_details(&self, bsid: i64) -> Result<BuildsetDetails> {
        let mut conn = self.read.acquire().await?;
        Self::buildset_details_in(&mut conn, bsid).await
    }

    pub(super) async fn buildset_details_in(conn: &mut AnyConnection, bsid: i64) -> Result<BuildsetDetails> {
        let rows = sqlx::query(
            "SELECT b.reason, b.properties, s.branch, s.revision, s.repository, s.project, s.codebase \
             FROM buildsets b LEFT JOIN buildset_sourcestamps bs ON bs.buildsetid = b.id \
             LEFT JOIN sourcestamps s ON s.id = bs.sourcestampid WHERE b.id = $1 ORDER BY s.codebase",
        )
        .bind(bsid)
        .fetch_all(&mut *conn)
        .await?;
        let first = rows.first().ok_or_else(|| StoreError::NotFound(format!("buildset {bsid}")))?;
        let reason: String = first.try_get("reason")?;
        let props: String = first.try_get("properties")?;
        let props = serde_json::from_str(&props).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut sourcestamps = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(repository) = row.try_get::<Option<String>, _>("repository")? else { continue };
            sourcestamps.push(SourceStamp {
                branch: row.try_get("branch")?,
                revision: row.try_get("revision")?,
                repository,
                project: row.try_get::<Option<String>, _>("project")?.unwrap_or_default(),
                codebase: row.try_get::<Option<String>, _>("codebase")?.unwrap_or_default(),
            });
        }
        let authors = sqlx::query(
            "SELECT DISTINCT c.author FROM changes c JOIN buildset_sourcestamps bs ON bs.sourcestampid = c.sourcestampid \
             WHERE bs.buildsetid = $1 ORDER BY c.author",
        )
        .bind(bsid)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get::<String, _>("author"))
        .collect::<Result<_, _>>()?;
        Ok(BuildsetDetails { reason, properties: Properties::from_json(&props), sourcestamps, authors })
    }

    // ---------------------------------------------------------------------------------------
    // The queue

    /// Completes buildset `bsid` with the worst result of its requests once all are complete.
    pub(super) async fn maybe_complete_buildset(
        conn: &mut sqlx::AnyConnection,
        bsid: i64,
        now: i64,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        let rows = sqlx::query("SELECT complete, results FROM buildrequests WHERE buildsetid = $1")
            .bind(bsid)
            .fetch_all(&mut *conn)
            .await?;
        // As in Buildbot, a buildset starts from SUCCESS: one whose requests were all collapsed
        // (SKIPPED) reports SUCCESS.
        let mut results = Results::Success;
        for row in &rows {
            if get_i64(row, "complete")? == 0 {
                return Ok(());
            }
            results = results.worst(Results::from_code(get_i64(row, "results")?).unwrap_or(Results::Exception));
        }
        let done = sqlx::query(
            "UPDATE buildsets SET complete = 1, complete_at = $1, results = $2 WHERE id = $3 AND complete = 0",
        )
        .bind(now)
        .bind(results.code())
        .bind(bsid)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() > 0 {
            events.push(Event::new(Topic::Buildsets, bsid, "complete"));
            sqlx::query(
                "INSERT INTO completed_buildsets (bsid, results) VALUES ($1, $2) ON CONFLICT (bsid) DO NOTHING",
            )
            .bind(bsid)
            .bind(results.code())
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}
