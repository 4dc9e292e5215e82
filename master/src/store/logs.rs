//! How log text is kept in `logchunks`: zstd-compressed above a small size, raw below it, with
//! Buildbot's compression ids (0 raw, 4 zstd).

use super::{Result, StoreError};

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
