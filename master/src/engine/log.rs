//! A step's log as it is written: lines with Buildbot's stream prefixes, flushed in chunks, kept
//! within `logMaxSize` with a tail, and held in memory through a short database outage.

use std::time::{Duration, Instant};

use super::LogLimits;
use crate::remote::Stream;
use crate::store::{LogTail, Store, StoreError};

/// Buffers a step's output into lines with Buildbot's channel prefixes and writes them to the
/// store in chunks while the step runs: when enough has gathered or every flush interval.
pub(super) struct LogWriter {
    pub(super) store: Store,
    pub(super) logid: i64,
    pub(super) next_line: i64,
    /// Complete, prefixed lines not yet written.
    pub(super) pending: String,
    /// Incomplete last line of each stream (stdout, stderr, header).
    pub(super) partial: [Vec<u8>; 3],
    pub(super) last_flush: Instant,
    pub(super) limits: LogLimits,
    /// Bytes of lines kept so far.
    pub(super) kept: usize,
    /// Once the log exceeded `limits.max`: what was dropped, and the last lines kept for the tail.
    pub(super) truncated: Option<Truncated>,
}

#[derive(Default)]
pub(super) struct Truncated {
    pub(super) dropped: usize,
    pub(super) tail: std::collections::VecDeque<String>,
    pub(super) tail_bytes: usize,
}

impl LogWriter {
    pub(super) const FLUSH_BYTES: usize = 64 * 1024;
    pub(super) const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
    /// Output kept in memory while the database is unreachable before the build gives up.
    pub(super) const OUTAGE_BUFFER: usize = 16 * 1024 * 1024;

    pub(super) fn new(store: Store, logid: i64, limits: LogLimits) -> Self {
        Self {
            store,
            logid,
            next_line: 0,
            pending: String::new(),
            partial: Default::default(),
            last_flush: Instant::now(),
            limits,
            kept: 0,
            truncated: None,
        }
    }

    pub(super) fn header(&mut self, text: &str) {
        self.append(Stream::Header, text.as_bytes());
    }

    pub(super) fn append(&mut self, stream: Stream, data: &[u8]) {
        let index = match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
            Stream::Header => 2,
        };
        let partial = &mut self.partial[index];
        partial.extend_from_slice(data);
        let Some(last_newline) = partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = partial.drain(..=last_newline).collect();
        for line in String::from_utf8_lossy(&complete).split_inclusive('\n') {
            self.line(format!("{}{line}", stream.prefix()));
        }
    }

    /// Keeps a prefixed line, or counts it dropped (and perhaps keeps it for the tail) once the
    /// log is over its limit.
    pub(super) fn line(&mut self, line: String) {
        let Some(max) = self.limits.max else {
            self.pending.push_str(&line);
            return;
        };
        if self.truncated.is_none() && self.kept + line.len() <= max {
            self.kept += line.len();
            self.pending.push_str(&line);
            return;
        }
        let truncated = self.truncated.get_or_insert_with(|| {
            self.pending.push_str(&format!("hOutput exceeded logMaxSize ({max} bytes): the rest is not kept\n"));
            Truncated::default()
        });
        truncated.dropped += line.len();
        if let Some(tail) = self.limits.tail.filter(|t| *t > 0) {
            truncated.tail_bytes += line.len();
            truncated.tail.push_back(line);
            while truncated.tail_bytes > tail {
                let first = truncated.tail.pop_front().expect("over the limit, so not empty");
                truncated.tail_bytes -= first.len();
            }
        }
    }

    pub(super) async fn flush_if_due(&mut self) -> Result<(), StoreError> {
        if self.pending.len() >= Self::FLUSH_BYTES || self.last_flush.elapsed() >= Self::FLUSH_INTERVAL {
            self.flush().await?;
        }
        Ok(())
    }

    pub(super) async fn flush(&mut self) -> Result<(), StoreError> {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.pending);
        match self.store.append_log(self.logid, self.next_line, &text).await {
            Ok(next) => {
                self.next_line = next;
                crate::telemetry::log_bytes(text.len());
                Ok(())
            }
            // While the database is unreachable the output is kept here and written with the
            // next flush, up to a bound; the command goes on.
            Err(error) if error.is_unavailable() && text.len() < Self::OUTAGE_BUFFER => {
                self.pending = text + &self.pending;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Ends the log: terminates unfinished lines, adds the tail of a truncated log, and returns
    /// what is left to write.
    pub(super) fn into_tail(mut self) -> LogTail {
        for (index, stream) in [Stream::Stdout, Stream::Stderr, Stream::Header].into_iter().enumerate() {
            if !self.partial[index].is_empty() {
                self.append(stream, b"\n");
            }
        }
        if let Some(truncated) = self.truncated.take() {
            let shown = truncated.tail_bytes;
            let lost = truncated.dropped - shown;
            if shown == 0 {
                self.pending.push_str(&format!("h{lost} bytes of output were not kept\n"));
            } else {
                self.pending.push_str(&format!("h{lost} bytes of output were not kept; the last {shown} follow\n"));
                self.pending.extend(truncated.tail);
            }
        }
        LogTail { logid: self.logid, first_line: self.next_line, text: std::mem::take(&mut self.pending) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn writer(limits: LogLimits) -> LogWriter {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        LogWriter::new(store, 1, limits)
    }

    fn lines(from: usize, to: usize) -> String {
        (from..to).map(|i| format!("line {i:03}\n")).collect()
    }

    #[tokio::test]
    async fn a_log_over_its_limit_keeps_its_start_and_its_tail() {
        // Each stored line is 10 bytes: the prefix, "line NNN" and the newline.
        let mut log = writer(LogLimits { max: Some(30), tail: Some(20) }).await;
        log.append(Stream::Stdout, lines(0, 10).as_bytes());
        let text = log.into_tail().text;
        let expected = "oline 000\noline 001\noline 002\n\
                        hOutput exceeded logMaxSize (30 bytes): the rest is not kept\n\
                        h50 bytes of output were not kept; the last 20 follow\n\
                        oline 008\noline 009\n";
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn without_a_tail_the_rest_is_counted_and_without_a_limit_all_is_kept() {
        let mut log = writer(LogLimits { max: Some(25), tail: None }).await;
        log.append(Stream::Stderr, lines(0, 4).as_bytes());
        let text = log.into_tail().text;
        assert!(text.starts_with("eline 000\neline 001\nhOutput exceeded"), "{text}");
        assert!(text.ends_with("h20 bytes of output were not kept\n"), "{text}");

        let mut log = writer(LogLimits::default()).await;
        log.append(Stream::Stdout, lines(0, 100).as_bytes());
        assert_eq!(log.into_tail().text.len(), 1000);
    }
}
