//! Log text in `logchunks`: appending, reading and expiry, zstd-compressed above a small size and
//! raw below it, with Buildbot's compression ids (0 raw, 4 zstd).

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{Result, Store, StoreError, get_i64};
use crate::events::{Event, Topic};

/// Chunks smaller than this are stored raw: compression would not pay for its frame.
const COMPRESS_ABOVE: usize = 256;
const RAW: i64 = 0;
const ZSTD: i64 = 4;

/// A stored piece of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub first_line: i64,
    pub text: String,
}

/// Encodes text for storage; returns the bytes and the compression id.
pub fn encode_chunk(text: &[u8]) -> (Vec<u8>, i64) {
    if text.len() > COMPRESS_ABOVE
        && let Ok(compressed) = zstd::bulk::compress(text, 3)
        && compressed.len() < text.len()
    {
        return (compressed, ZSTD);
    }
    (text.to_vec(), RAW)
}

/// Decodes a stored chunk back to text.
pub fn decode_chunk(content: &[u8], compression: i64) -> Result<String> {
    let bytes = match compression {
        RAW => content.to_vec(),
        ZSTD => zstd::stream::decode_all(content).map_err(|e| StoreError::Corrupt(format!("log chunk: {e}")))?,
        other => {
            return Err(StoreError::Corrupt(format!("unknown log compression {other}")));
        }
    };
    String::from_utf8(bytes).map_err(|e| StoreError::Corrupt(format!("log chunk is not UTF-8: {e}")))
}

/// The last lines of a log, written when its step finishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTail {
    pub logid: i64,
    pub first_line: i64,
    pub text: String,
}

impl Store {
    /// Appends whole lines (each ending in `\n`) to a log as one compressed chunk; returns the
    /// number of the next line.
    pub async fn append_log(&self, logid: i64, first_line: i64, text: &str) -> Result<i64> {
        let mut tx = self.write.begin().await?;
        let next = Self::append_log_in(&mut tx, logid, first_line, text).await?;
        tx.commit().await?;
        if next > first_line {
            self.published(vec![Event::new(Topic::Logs, logid, "append")]);
        }
        Ok(next)
    }

    pub(super) async fn append_log_in(
        conn: &mut AnyConnection,
        logid: i64,
        first_line: i64,
        text: &str,
    ) -> Result<i64> {
        let lines = Self::insert_chunk(conn, logid, first_line, text).await?;
        if lines > 0 {
            sqlx::query("UPDATE logs SET num_lines = $1 WHERE id = $2")
                .bind(first_line + lines)
                .bind(logid)
                .execute(&mut *conn)
                .await?;
        }
        Ok(first_line + lines)
    }

    /// Stores whole lines as chunks from `first_line`; returns how many lines are stored from
    /// there on.
    ///
    /// A log has one writer, the build holding its claim, and it writes each chunk from the line
    /// after the last one stored. A chunk already stored at `first_line` was therefore written by
    /// an attempt whose commit succeeded although its caller saw an error (the connection dropped
    /// as the database answered), and the text given now begins with that attempt's, followed by
    /// what came since: those lines stay as they are, and only the rest is written.
    pub(super) async fn insert_chunk(conn: &mut AnyConnection, logid: i64, first_line: i64, text: &str) -> Result<i64> {
        let lines = text.matches('\n').count() as i64;
        let mut stored = 0;
        let mut rest = text;
        while stored < lines {
            let (content, compressed) = encode_chunk(rest.as_bytes());
            let written = sqlx::query(
                "INSERT INTO logchunks (logid, first_line, last_line, content, compressed) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (logid, first_line) DO NOTHING",
            )
            .bind(logid)
            .bind(first_line + stored)
            .bind(first_line + lines - 1)
            .bind(content)
            .bind(compressed)
            .execute(&mut *conn)
            .await?;
            if written.rows_affected() > 0 {
                return Ok(lines);
            }
            let row = sqlx::query("SELECT last_line FROM logchunks WHERE logid = $1 AND first_line = $2")
                .bind(logid)
                .bind(first_line + stored)
                .fetch_one(&mut *conn)
                .await?;
            let there = get_i64(&row, "last_line")? + 1 - first_line;
            if there <= stored {
                return Err(StoreError::Corrupt(format!(
                    "log {logid}: a chunk at line {} ends before it",
                    first_line + stored
                )));
            }
            // The stored lines are skipped: `rest` goes on after the newline ending the last.
            let skip = (there.min(lines) - stored) as usize;
            rest = rest.match_indices('\n').nth(skip - 1).map_or("", |(end, _)| &rest[end + 1..]);
            stored = there;
        }
        Ok(stored)
    }

    /// Deletes the text of up to `limit` logs of builds that finished before `before` (in
    /// milliseconds), in one short transaction, and marks them deleted (type `d`, as Buildbot
    /// does); the logs' rows, steps and builds stay. Returns how many logs it deleted: fewer than
    /// `limit` means none is left.
    pub async fn delete_old_logs(&self, before: i64, limit: i64) -> Result<u64> {
        // The same batch twice in one transaction: its chunks go first, then the logs are marked.
        const BATCH: &str = "SELECT l.id FROM logs l JOIN steps s ON s.id = l.stepid JOIN builds b ON b.id = s.buildid \
             WHERE l.type <> 'd' AND b.complete_at IS NOT NULL AND b.complete_at < $1 ORDER BY l.id LIMIT $2";
        let mut tx = self.write.begin().await?;
        sqlx::query(AssertSqlSafe(format!("DELETE FROM logchunks WHERE logid IN ({BATCH})")))
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
        let marked = sqlx::query(AssertSqlSafe(format!("UPDATE logs SET type = 'd' WHERE id IN ({BATCH})")))
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(marked.rows_affected())
    }

    /// Lines `offset..offset+limit` of a log (all from `offset` when `limit` is `None`), as stored
    /// (stdio lines keep their one-letter channel prefix).
    pub async fn log_lines(&self, logid: i64, offset: i64, limit: Option<i64>) -> Result<String> {
        let last = limit.map(|l| offset + l - 1).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT first_line, content, compressed FROM logchunks WHERE logid = $1 AND last_line >= $2 AND first_line <= $3 \
             ORDER BY first_line",
        )
        .bind(logid)
        .bind(offset)
        .bind(last)
        .fetch_all(&self.read)
        .await?;
        let mut out = String::new();
        for row in rows {
            let first: i64 = row.try_get("first_line")?;
            let content: Vec<u8> = row.try_get("content")?;
            let compressed: i64 = row.try_get("compressed")?;
            let text = decode_chunk(&content, compressed)?;
            for (i, line) in text.split_inclusive('\n').enumerate() {
                let n = first + i as i64;
                if n >= offset && n <= last {
                    out.push_str(line);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_chunks_stay_raw_and_large_ones_shrink() {
        let (raw, id) = encode_chunk(b"ohello\n");
        assert_eq!((raw.as_slice(), id), (b"ohello\n".as_slice(), RAW));
        let big = "ocompiling crate number one of many\n".repeat(200);
        let (packed, id) = encode_chunk(big.as_bytes());
        assert_eq!(id, ZSTD);
        assert!(packed.len() * 10 < big.len());
        assert_eq!(decode_chunk(&packed, id).unwrap(), big);
    }
}
