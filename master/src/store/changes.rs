//! Changes and the source stamps they point at.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Result, Store, StoreError, get_i64};
use crate::domain::{Change, Delivery, NewChange, SourceStamp};
use crate::events::{Event, Topic};
use crate::properties::Properties;

impl Store {
    pub(super) async fn find_or_create_sourcestamp(
        conn: &mut sqlx::AnyConnection,
        ss: &SourceStamp,
        now: i64,
    ) -> Result<i64> {
        let hash = sourcestamp_hash(ss);
        sqlx::query(
            "INSERT INTO sourcestamps (ss_hash, branch, revision, repository, project, codebase, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (ss_hash) DO NOTHING",
        )
        .bind(&hash)
        .bind(ss.branch.clone())
        .bind(ss.revision.clone())
        .bind(&ss.repository)
        .bind(&ss.project)
        .bind(&ss.codebase)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let row =
            sqlx::query("SELECT id FROM sourcestamps WHERE ss_hash = $1").bind(&hash).fetch_one(&mut *conn).await?;
        get_i64(&row, "id")
    }

    /// Stores a change (and its source stamp) durably.
    pub async fn add_change(&self, change: &NewChange) -> Result<Change> {
        Ok(self.add_changes(std::slice::from_ref(change)).await?.remove(0))
    }

    /// Stores several changes in one transaction: all of them or none.
    pub async fn add_changes(&self, changes: &[NewChange]) -> Result<Vec<Change>> {
        let mut tx = self.write.begin().await?;
        let stored = Self::add_changes_in(&mut tx, changes, self.now_ms()).await?;
        tx.commit().await?;
        self.published(Self::new_changes(&stored));
        Ok(stored)
    }

    /// Stores the changes of one webhook delivery in one transaction with the delivery's id, so
    /// that the same delivery is stored once however often it comes, to whichever master.
    /// Returns `None` when the delivery was seen before (and stores nothing).
    pub async fn add_delivered_changes(
        &self,
        delivery: &Delivery,
        changes: &[NewChange],
    ) -> Result<Option<Vec<Change>>> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let first = sqlx::query(
            "INSERT INTO hook_deliveries (source, delivery, received_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&delivery.source)
        .bind(&delivery.id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if first.rows_affected() == 0 {
            return Ok(None);
        }
        let stored = Self::add_changes_in(&mut tx, changes, now).await?;
        tx.commit().await?;
        self.published(Self::new_changes(&stored));
        Ok(Some(stored))
    }

    /// Forgets deliveries received before `before` (ms); returns how many.
    pub async fn forget_deliveries_before(&self, before: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM hook_deliveries WHERE received_at < $1").bind(before).execute(&self.write).await?;
        Ok(done.rows_affected())
    }

    /// The events of stored changes.
    pub(super) fn new_changes(stored: &[Change]) -> Vec<Event> {
        stored.iter().map(|c| Event::new(Topic::Changes, c.changeid, "new")).collect()
    }

    pub(super) async fn add_changes_in(tx: &mut AnyConnection, changes: &[NewChange], now: i64) -> Result<Vec<Change>> {
        let mut stored = Vec::with_capacity(changes.len());
        for change in changes {
            let ssid = Self::find_or_create_sourcestamp(tx, &change.sourcestamp(), now).await?;
            let files = serde_json::to_string(&change.files).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let row = sqlx::query(
                "INSERT INTO changes (author, committer, comments, branch, revision, revlink, when_timestamp, \
                 category, repository, codebase, project, files, properties, sourcestampid) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING changeid",
            )
            .bind(&change.author)
            .bind(change.committer.clone())
            .bind(&change.comments)
            .bind(change.branch.clone())
            .bind(change.revision.clone())
            .bind(change.revlink.clone())
            .bind(change.when_ms.unwrap_or(now))
            .bind(change.category.clone())
            .bind(&change.repository)
            .bind(&change.codebase)
            .bind(&change.project)
            .bind(files)
            .bind(change.properties.to_json().to_string())
            .bind(ssid)
            .fetch_one(&mut *tx)
            .await?;
            let changeid = get_i64(&row, "changeid")?;
            sqlx::query("INSERT INTO unscheduled_changes (changeid, stored_at) VALUES ($1, $2)")
                .bind(changeid)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            stored.push(Change { changeid, sourcestampid: ssid, change: change.clone() });
        }
        Ok(stored)
    }

    /// Records that `scheduler` acts on `changeid` now, inside the transaction that acts; false
    /// when it acted on it before (the change is being scheduled again), and it must not act
    /// twice.
    pub(super) async fn acting_on(conn: &mut AnyConnection, changeid: i64, scheduler: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO change_schedulings (changeid, scheduler, acted_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(changeid)
        .bind(scheduler)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that every scheduler has acted on a change.
    pub async fn change_scheduled(&self, changeid: i64) -> Result<()> {
        sqlx::query("DELETE FROM unscheduled_changes WHERE changeid = $1").bind(changeid).execute(&self.write).await?;
        Ok(())
    }

    /// Up to `limit` changes stored before `stored_before` (ms) that the schedulers have not all
    /// acted on: their master stopped while scheduling them. Oldest first.
    pub async fn unscheduled_changes(&self, stored_before: i64, limit: i64) -> Result<Vec<Change>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CHANGE_COLUMNS} FROM unscheduled_changes u JOIN changes c ON c.changeid = u.changeid \
                 WHERE u.stored_at < $1 ORDER BY c.changeid LIMIT $2"
        )))
        .bind(stored_before)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    /// Forgets which schedulers acted on changes before `before` (ms): a change is scheduled
    /// again within seconds of its master's death, never days later.
    pub async fn forget_change_schedulings_before(&self, before: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM change_schedulings WHERE acted_at < $1").bind(before).execute(&self.write).await?;
        Ok(done.rows_affected())
    }
}

/// The columns of `changes` (as `c`) that [`change_from_row`] reads.
pub(super) const CHANGE_COLUMNS: &str = "c.changeid, c.author, c.committer, c.comments, c.branch, c.revision, c.revlink, \
     c.when_timestamp, c.category, c.repository, c.codebase, c.project, c.files, c.properties, c.sourcestampid";

/// A stored change from a row of `changes`.
pub(super) fn change_from_row(row: &AnyRow) -> Result<Change> {
    let files: String = row.try_get("files")?;
    let properties: String = row.try_get("properties")?;
    let properties: serde_json::Value =
        serde_json::from_str(&properties).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Change {
        changeid: get_i64(row, "changeid")?,
        sourcestampid: get_i64(row, "sourcestampid")?,
        change: NewChange {
            author: row.try_get("author")?,
            committer: row.try_get("committer")?,
            comments: row.try_get("comments")?,
            branch: row.try_get("branch")?,
            revision: row.try_get("revision")?,
            revlink: row.try_get("revlink")?,
            when_ms: Some(get_i64(row, "when_timestamp")?),
            category: row.try_get("category")?,
            repository: row.try_get("repository")?,
            codebase: row.try_get("codebase")?,
            project: row.try_get("project")?,
            files: serde_json::from_str(&files).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            properties: Properties::from_json(&properties),
        },
    })
}

/// A stable key for de-duplicating source stamps.
pub(super) fn sourcestamp_hash(ss: &SourceStamp) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in
        [ss.branch.as_deref(), ss.revision.as_deref(), Some(&ss.repository), Some(&ss.project), Some(&ss.codebase)]
    {
        match part {
            Some(p) => {
                hasher.update(b"s");
                hasher.update(p.as_bytes());
            }
            None => hasher.update(b"n"),
        }
        hasher.update([0u8]);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sourcestamp_hashes_tell_none_from_empty() {
        let a = SourceStamp { branch: None, ..Default::default() };
        let b = SourceStamp { branch: Some(String::new()), ..Default::default() };
        assert_ne!(sourcestamp_hash(&a), sourcestamp_hash(&b));
    }
}
