//! Comparing secrets (worker tokens, API credentials, webhook signatures) in time that does not
//! reveal where a guess went wrong.

/// Whether two byte strings are equal, taking the same time wherever they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `given` equals any of `secrets`; every secret is compared, so the time taken does not
/// reveal which one was close.
pub fn matches_any(secrets: &[String], given: &str) -> bool {
    secrets.iter().fold(false, |ok, secret| constant_time_eq(secret.as_bytes(), given.as_bytes()) | ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_secrets_match() {
        let secrets = vec!["alpha".to_owned(), "beta".to_owned()];
        assert!(matches_any(&secrets, "beta"));
        assert!(!matches_any(&secrets, "bet"));
        assert!(!matches_any(&secrets, "betaa"));
        assert!(!matches_any(&[], "beta"));
    }
}
