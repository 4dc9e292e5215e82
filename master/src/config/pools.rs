//! Worker pools in the configuration: their builders, size limits and backend.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::{BuilderConfig, one};

/// A set of identical workers serving some builders, sized from the queue.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique among pools; workers name their pool when they register (`--pool`).
    pub name: String,
    /// Who runs the workers.
    pub backend: BackendKind,
    /// Builders the pool serves, by name…
    #[serde(default)]
    pub builders: Vec<String>,
    /// …and by tag: builders carrying any of these tags. With neither, every builder.
    #[serde(default)]
    pub labels: Vec<String>,
    /// A fixed number of workers (the same as `min` = `max` = `count`).
    #[serde(default)]
    pub count: Option<u32>,
    /// Fewest workers kept (default 1).
    #[serde(default)]
    pub min: Option<u32>,
    /// Most workers at once (default 4).
    #[serde(default)]
    pub max: Option<u32>,
    /// Builds each worker runs at once.
    #[serde(default = "one")]
    pub builds_per_worker: u32,
    /// Idle workers kept ready beyond what the queue needs.
    #[serde(default)]
    pub warm: u32,
    /// Seconds the queue must need fewer workers before the pool shrinks.
    #[serde(default = "default_scale_down_delay")]
    pub scale_down_delay: f64,
    /// Settings of the `local` backend.
    #[serde(default)]
    pub local: LocalBackendConfig,
    /// Settings of the `kubernetes` backend (required with it).
    #[serde(default)]
    pub kubernetes: Option<KubernetesBackendConfig>,
}

/// Who starts and stops a pool's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `kiln-worker` processes the master starts on its own machine.
    Local,
    /// A Deployment whose replica count the master sets.
    Kubernetes,
    /// Workers managed elsewhere: the master only reports the size it would want.
    Static,
}

/// `kiln-worker` processes on the master's machine.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalBackendConfig {
    /// The `kiln-worker` binary; by default the one beside `kiln-master`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Prefix of the workers' names (default: the pool's name): `local-1`, `local-2`, …
    #[serde(default)]
    pub name_prefix: Option<String>,
}

/// A Deployment of workers.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KubernetesBackendConfig {
    /// The Deployment's namespace; by default the master's own (or the kubeconfig's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Deployment's name.
    pub deployment: String,
}

impl PoolConfig {
    /// The pool's sizing rules.
    pub fn policy(&self) -> crate::scaling::Policy {
        let (min, max) = match self.count {
            Some(count) => (count, count),
            None => (self.min.unwrap_or(1), self.max.unwrap_or(4)),
        };
        crate::scaling::Policy {
            min,
            max,
            builds_per_worker: self.builds_per_worker.max(1),
            warm: self.warm,
            scale_down_delay: std::time::Duration::from_secs_f64(self.scale_down_delay.max(0.0)),
        }
    }

    /// Whether the pool serves a builder.
    pub fn serves(&self, builder: &BuilderConfig) -> bool {
        (self.builders.is_empty() && self.labels.is_empty())
            || self.builders.contains(&builder.name)
            || builder.tags.iter().any(|t| self.labels.contains(t))
    }

    /// Prefix of local workers' names.
    pub fn name_prefix(&self) -> &str {
        self.local.name_prefix.as_deref().unwrap_or(&self.name)
    }
}

pub(super) fn default_scale_down_delay() -> f64 {
    60.0
}

pub(super) fn validate_pool(key: &str, pool: &PoolConfig, builders: &[BuilderConfig]) -> Result<(), (String, String)> {
    let valid_name = |n: &str| {
        !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !valid_name(&pool.name) {
        return Err((format!("{key}.name"), "must be 1 to 63 letters, digits, '-' or '_'".into()));
    }
    if pool.count.is_some() && (pool.min.is_some() || pool.max.is_some()) {
        return Err((key.to_owned(), "give count, or min and max, not both".into()));
    }
    // Checked before the policy, which holds it as a `Duration`.
    super::seconds_or_zero(&format!("{key}.scale_down_delay"), pool.scale_down_delay)?;
    let policy = pool.policy();
    if policy.max == 0 || pool.builds_per_worker == 0 {
        return Err((key.to_owned(), "max (or count) and builds_per_worker must be at least 1".into()));
    }
    if policy.min > policy.max {
        return Err((format!("{key}.min"), format!("min {} is above max {}", policy.min, policy.max)));
    }
    for (i, name) in pool.builders.iter().enumerate() {
        if !builders.iter().any(|b| &b.name == name) {
            return Err((format!("{key}.builders[{i}]"), format!("no builder is named {name:?}")));
        }
    }
    if !builders.iter().any(|b| pool.serves(b)) {
        return Err((key.to_owned(), "serves no builder: no builder has one of its names or labels".into()));
    }
    match (pool.backend, &pool.kubernetes) {
        (BackendKind::Kubernetes, None) => {
            return Err((format!("{key}.kubernetes"), "the kubernetes backend needs the deployment to scale".into()));
        }
        (BackendKind::Kubernetes, Some(k)) if k.deployment.is_empty() => {
            return Err((format!("{key}.kubernetes.deployment"), "must not be empty".into()));
        }
        (BackendKind::Local | BackendKind::Static, Some(_)) => {
            return Err((format!("{key}.kubernetes"), "only for the kubernetes backend".into()));
        }
        _ => {}
    }
    if pool.backend != BackendKind::Local && (pool.local.binary.is_some() || pool.local.name_prefix.is_some()) {
        return Err((format!("{key}.local"), "only for the local backend".into()));
    }
    Ok(())
}

/// Each pool, and that their names differ.
pub(super) fn validate(pools: &[PoolConfig], builders: &[BuilderConfig]) -> Result<(), (String, String)> {
    let mut pool_names = BTreeSet::new();
    for (i, pool) in pools.iter().enumerate() {
        let key = format!("pools[{i}]");
        validate_pool(&key, pool, builders)?;
        if !pool_names.insert(pool.name.as_str()) {
            return Err((format!("{key}.name"), format!("another pool is named {:?}", pool.name)));
        }
    }
    Ok(())
}
