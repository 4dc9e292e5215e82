//! The domain's values, as every part of the master speaks of them: changes, source stamps,
//! buildsets and the requests claimed from the queue. Plain data with no persistence, transport or
//! IO: the store reads and writes them, the schedulers and change hooks make them.

use crate::properties::Properties;
use crate::results::Results;

/// A change as a change source or hook reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewChange {
    pub author: String,
    pub committer: Option<String>,
    pub comments: String,
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub revlink: Option<String>,
    /// Milliseconds; the time of the change itself, not of its arrival. `None` when the source
    /// does not say: the store then records when it arrived.
    pub when_ms: Option<i64>,
    pub category: Option<String>,
    pub repository: String,
    pub codebase: String,
    pub project: String,
    pub files: Vec<String>,
    pub properties: Properties,
}

impl NewChange {
    /// The first text field holding a NUL byte, which no database stores the same way (PostgreSQL
    /// refuses it), so a change with one is refused before it is stored.
    pub fn nul_field(&self) -> Option<&'static str> {
        let texts: [(&'static str, Option<&str>); 10] = [
            ("author", Some(&self.author)),
            ("committer", self.committer.as_deref()),
            ("comments", Some(&self.comments)),
            ("branch", self.branch.as_deref()),
            ("revision", self.revision.as_deref()),
            ("revlink", self.revlink.as_deref()),
            ("category", self.category.as_deref()),
            ("repository", Some(&self.repository)),
            ("codebase", Some(&self.codebase)),
            ("project", Some(&self.project)),
        ];
        texts
            .into_iter()
            .find(|(_, text)| text.is_some_and(|t| t.contains('\0')))
            .map(|(name, _)| name)
            .or_else(|| self.files.iter().any(|f| f.contains('\0')).then_some("files"))
    }

    /// The source state the change describes.
    pub fn sourcestamp(&self) -> SourceStamp {
        SourceStamp {
            branch: self.branch.clone(),
            revision: self.revision.clone(),
            repository: self.repository.clone(),
            project: self.project.clone(),
            codebase: self.codebase.clone(),
        }
    }
}

/// A stored change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub changeid: i64,
    pub sourcestampid: i64,
    pub change: NewChange,
}

/// The state of one codebase's sources a build is asked to build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStamp {
    pub branch: Option<String>,
    pub revision: Option<String>,
    pub repository: String,
    pub project: String,
    pub codebase: String,
}

impl From<&SourceStamp> for crate::properties::SourceView {
    fn from(ss: &SourceStamp) -> Self {
        crate::properties::SourceView {
            codebase: ss.codebase.clone(),
            branch: ss.branch.clone(),
            revision: ss.revision.clone(),
            repository: ss.repository.clone(),
            project: ss.project.clone(),
        }
    }
}

/// One webhook delivery, by the id its sender gives it (and repeats when it redelivers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The dialect it came through: `github`, `gitlab`.
    pub source: String,
    pub id: String,
}

/// What a scheduler asks to be built.
#[derive(Debug, Clone, Default)]
pub struct NewBuildset {
    pub reason: String,
    pub external_idstring: Option<String>,
    pub properties: Properties,
    pub sourcestamps: Vec<SourceStamp>,
    pub builderids: Vec<i64>,
    pub priority: i64,
    /// The build this buildset rebuilds, if any.
    pub rebuilt_buildid: Option<i64>,
    /// Builders whose older compatible requests this buildset's requests collapse.
    pub collapse_builderids: Vec<i64>,
    /// The build whose `trigger` step submitted this buildset, and how they relate.
    pub parent_buildid: Option<i64>,
    pub parent_relationship: Option<String>,
    /// Whether the parent waits for these requests.
    pub waited_for: bool,
}

/// A buildset just stored, with the request it made for each builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub bsid: i64,
    pub requests: Vec<SubmittedRequest>,
}

/// One build request of a [`Submitted`] buildset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmittedRequest {
    pub builderid: i64,
    pub brid: i64,
}

/// What came of trying to fire a timed scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firing {
    /// Another master fired it first.
    TakenElsewhere,
    /// It fired; the buildset it submitted, if its changes (or lack of them) called for one.
    Fired(Option<Submitted>),
}

/// A build request this master has claimed. `claim_token` fences it: only the holder of the
/// current token may finish or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedRequest {
    pub brid: i64,
    pub buildsetid: i64,
    pub builderid: i64,
    pub priority: i64,
    pub submitted_at_ms: i64,
    pub claim_token: i64,
}

/// Everything a build needs to know about what it builds.
#[derive(Debug, Clone, Default)]
pub struct BuildsetDetails {
    pub reason: String,
    pub properties: Properties,
    pub sourcestamps: Vec<SourceStamp>,
    /// The authors of the buildset's changes, each once, in order (Buildbot's blamelist).
    pub authors: Vec<String>,
}

/// Where a build came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOrigin {
    pub brid: i64,
    pub builderid: i64,
    pub buildsetid: i64,
    pub priority: i64,
    pub request_complete: bool,
}

/// A buildset that completed, as the outbox reports it.
#[derive(Debug, Clone)]
pub struct CompletedBuildset {
    pub bsid: i64,
    pub results: Results,
    pub details: BuildsetDetails,
}
