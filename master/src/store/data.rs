//! The read side of the data API: each resource as Buildbot-shaped JSON objects, filtered,
//! ordered and paged in SQL, so a large collection is never loaded whole.

use serde_json::{Map, Value, json};
use sqlx::any::AnyRow;
// Every dynamic statement here is assembled from the constant field specs above; client values
// only ever reach the database as bound parameters.
use sqlx::{AnyPool, AssertSqlSafe, Row};

/// A collection of the data API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Builders,
    Builds,
    BuildRequests,
    Buildsets,
    Changes,
    SourceStamps,
    Workers,
    Masters,
    Steps,
    Logs,
    Schedulers,
}

/// A comparison of Buildbot's query language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
    In,
    NotIn,
}

impl Op {
    pub fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "eq" => Op::Eq,
            "ne" => Op::Ne,
            "lt" => Op::Lt,
            "le" => Op::Le,
            "gt" => Op::Gt,
            "ge" => Op::Ge,
            "contains" => Op::Contains,
            "in" => Op::In,
            "notin" => Op::NotIn,
            _ => return None,
        })
    }
}

/// One condition on a field, with its values as the client wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub field: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// Filters, order and page of a collection read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub filters: Vec<Filter>,
    /// Field names, each optionally prefixed with `-` for descending order.
    pub order: Vec<String>,
    pub limit: Option<i64>,
    pub offset: i64,
}

impl ListQuery {
    /// A query for the one object whose key field equals `id`.
    pub fn by(field: &str, value: impl ToString) -> ListQuery {
        ListQuery {
            filters: vec![Filter { field: field.to_owned(), op: Op::Eq, values: vec![value.to_string()] }],
            ..Default::default()
        }
    }

    pub fn and(mut self, field: &str, value: impl ToString) -> ListQuery {
        self.filters.push(Filter { field: field.to_owned(), op: Op::Eq, values: vec![value.to_string()] });
        self
    }
}

/// Why a read could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("no field '{0}'")]
    UnknownField(String),
    #[error("invalid value {value:?} for '{field}': {reason}")]
    BadValue { field: String, value: String, reason: &'static str },
    #[error("operator not supported on '{0}'")]
    BadOperator(String),
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Bool,
    /// Milliseconds in the database, whole seconds in the API.
    Time,
    /// JSON text in the database, parsed in the API.
    Json,
}

struct Field {
    name: &'static str,
    sql: &'static str,
    kind: Kind,
}

const fn f(name: &'static str, sql: &'static str, kind: Kind) -> Field {
    Field { name, sql, kind }
}

struct Spec {
    from: &'static str,
    fields: &'static [Field],
    /// Order applied after the client's, so pages are stable.
    key: &'static str,
}

use Kind::{Bool, Int, Json, Text, Time};

const BUILDS: Spec = Spec {
    from: "builds",
    key: "id",
    fields: &[
        f("buildid", "id", Int),
        f("number", "number", Int),
        f("builderid", "builderid", Int),
        f("buildrequestid", "buildrequestid", Int),
        f("workerid", "workerid", Int),
        f("masterid", "masterid", Int),
        f("started_at", "started_at", Time),
        f("complete", "CASE WHEN complete_at IS NULL THEN 0 ELSE 1 END", Bool),
        f("complete_at", "complete_at", Time),
        f("locks_duration_s", "0", Int),
        f("results", "results", Int),
        f("state_string", "state_string", Text),
        f("properties", "properties", Json),
    ],
};

const BUILDREQUESTS: Spec = Spec {
    from: "buildrequests",
    key: "id",
    fields: &[
        f("buildrequestid", "id", Int),
        f("buildsetid", "buildsetid", Int),
        f("builderid", "builderid", Int),
        f("priority", "priority", Int),
        f("claimed", "CASE WHEN claimed_by_masterid IS NULL THEN 0 ELSE 1 END", Bool),
        f("claimed_at", "claimed_at", Time),
        f("claimed_by_masterid", "claimed_by_masterid", Int),
        f("complete", "complete", Bool),
        f("complete_at", "complete_at", Time),
        f("results", "results", Int),
        f("submitted_at", "submitted_at", Time),
        f("waited_for", "waited_for", Bool),
    ],
};

const BUILDERS: Spec = Spec {
    from: "builders",
    key: "id",
    fields: &[
        f("builderid", "id", Int),
        f("name", "name", Text),
        f("description", "description", Text),
        f("tags", "tags", Json),
    ],
};

const BUILDSETS: Spec = Spec {
    from: "buildsets",
    key: "id",
    fields: &[
        f("bsid", "id", Int),
        f("external_idstring", "external_idstring", Text),
        f("reason", "reason", Text),
        f("submitted_at", "submitted_at", Time),
        f("complete", "complete", Bool),
        f("complete_at", "complete_at", Time),
        f("results", "results", Int),
        f("parent_buildid", "parent_buildid", Int),
        f("parent_relationship", "parent_relationship", Text),
        f("rebuilt_buildid", "rebuilt_buildid", Int),
    ],
};

const CHANGES: Spec = Spec {
    from: "changes",
    key: "changeid",
    fields: &[
        f("changeid", "changeid", Int),
        f("author", "author", Text),
        f("committer", "committer", Text),
        f("comments", "comments", Text),
        f("branch", "branch", Text),
        f("revision", "revision", Text),
        f("revlink", "revlink", Text),
        f("when_timestamp", "when_timestamp", Time),
        f("category", "category", Text),
        f("repository", "repository", Text),
        f("codebase", "codebase", Text),
        f("project", "project", Text),
        f("files", "files", Json),
        f("properties", "properties", Json),
        f("sourcestampid", "sourcestampid", Int),
    ],
};

const SOURCESTAMPS: Spec = Spec {
    from: "sourcestamps",
    key: "id",
    fields: &[
        f("ssid", "id", Int),
        f("branch", "branch", Text),
        f("revision", "revision", Text),
        f("repository", "repository", Text),
        f("project", "project", Text),
        f("codebase", "codebase", Text),
        f("created_at", "created_at", Time),
    ],
};

const WORKERS: Spec = Spec {
    from: "workers",
    key: "id",
    fields: &[
        f("workerid", "id", Int),
        f("name", "name", Text),
        f("workerinfo", "info", Json),
        f("paused", "paused", Bool),
        f("pause_reason", "pause_reason", Text),
        f("graceful", "graceful", Bool),
        f("connected_masterid", "connected_masterid", Int),
        f("configured_on", "configured_on", Json),
    ],
};

const MASTERS: Spec = Spec {
    from: "masters",
    key: "id",
    fields: &[
        f("masterid", "id", Int),
        f("name", "name", Text),
        f("active", "active", Bool),
        f("last_active", "last_active", Time),
    ],
};

const STEPS: Spec = Spec {
    from: "steps",
    key: "id",
    fields: &[
        f("stepid", "id", Int),
        f("number", "number", Int),
        f("name", "name", Text),
        f("buildid", "buildid", Int),
        f("started_at", "started_at", Time),
        f("locks_acquired_at", "started_at", Time),
        f("complete", "CASE WHEN complete_at IS NULL THEN 0 ELSE 1 END", Bool),
        f("complete_at", "complete_at", Time),
        f("results", "results", Int),
        f("state_string", "state_string", Text),
        f("urls", "urls", Json),
        f("hidden", "hidden", Bool),
    ],
};

const SCHEDULERS: Spec = Spec {
    from: "schedulers",
    key: "id",
    fields: &[f("schedulerid", "id", Int), f("name", "name", Text), f("enabled", "enabled", Bool)],
};

const LOGS: Spec = Spec {
    from: "logs",
    key: "id",
    fields: &[
        f("logid", "id", Int),
        f("name", "name", Text),
        f("slug", "slug", Text),
        f("stepid", "stepid", Int),
        f("complete", "complete", Bool),
        f("num_lines", "num_lines", Int),
        f("type", "type", Text),
    ],
};

impl Resource {
    /// Every collection, in the order of the API's root links.
    pub const ALL: [Resource; 11] = [
        Resource::Builders,
        Resource::Builds,
        Resource::BuildRequests,
        Resource::Buildsets,
        Resource::Changes,
        Resource::SourceStamps,
        Resource::Workers,
        Resource::Masters,
        Resource::Steps,
        Resource::Logs,
        Resource::Schedulers,
    ];

    /// The collection a plural name (`builds`) names.
    pub fn from_plural(name: &str) -> Option<Resource> {
        Resource::ALL.into_iter().find(|r| r.plural() == name)
    }

    fn spec(self) -> &'static Spec {
        match self {
            Resource::Builders => &BUILDERS,
            Resource::Builds => &BUILDS,
            Resource::BuildRequests => &BUILDREQUESTS,
            Resource::Buildsets => &BUILDSETS,
            Resource::Changes => &CHANGES,
            Resource::SourceStamps => &SOURCESTAMPS,
            Resource::Workers => &WORKERS,
            Resource::Masters => &MASTERS,
            Resource::Steps => &STEPS,
            Resource::Logs => &LOGS,
            Resource::Schedulers => &SCHEDULERS,
        }
    }

    /// Each stored field with its type in Buildbot's spec vocabulary (`integer`, `string`,
    /// `boolean`, `datetime`, `jsonobject`).
    pub fn field_types(self) -> Vec<(&'static str, &'static str)> {
        self.spec()
            .fields
            .iter()
            .map(|f| {
                let kind = match f.kind {
                    Kind::Int => "integer",
                    Kind::Text => "string",
                    Kind::Bool => "boolean",
                    Kind::Time => "datetime",
                    Kind::Json => "jsonobject",
                };
                (f.name, kind)
            })
            .collect()
    }

    /// The key of the envelope, e.g. `builds`.
    pub fn plural(self) -> &'static str {
        match self {
            Resource::Builders => "builders",
            Resource::Builds => "builds",
            Resource::BuildRequests => "buildrequests",
            Resource::Buildsets => "buildsets",
            Resource::Changes => "changes",
            Resource::SourceStamps => "sourcestamps",
            Resource::Workers => "workers",
            Resource::Masters => "masters",
            Resource::Steps => "steps",
            Resource::Logs => "logs",
            Resource::Schedulers => "schedulers",
        }
    }

    /// Whether the objects of this resource have a field of that name (including fields the API
    /// adds, such as a buildset's `sourcestamps`).
    pub fn has_field(self, name: &str) -> bool {
        self.spec().fields.iter().any(|f| f.name == name) || self.extra_fields().contains(&name)
    }

    fn extra_fields(self) -> &'static [&'static str] {
        match self {
            Resource::Builders => &["masterids", "description_format", "description_html", "projectid"],
            Resource::Buildsets => &["sourcestamps"],
            Resource::Changes => &["sourcestamp", "parent_changeids"],
            Resource::SourceStamps => &["patch"],
            Resource::Workers => &["connected_to", "configured_on"],
            Resource::Schedulers => &["master"],
            _ => &[],
        }
    }
}

/// A bound value of a generated statement.
#[derive(Debug)]
enum Bind {
    Int(i64),
    Text(String),
}

fn field<'a>(spec: &'a Spec, name: &str) -> Result<&'a Field, DataError> {
    spec.fields.iter().find(|f| f.name == name).ok_or_else(|| DataError::UnknownField(name.to_owned()))
}

fn parse_value(field: &Field, value: &str) -> Result<Bind, DataError> {
    let bad = |reason| DataError::BadValue { field: field.name.to_owned(), value: value.to_owned(), reason };
    Ok(match field.kind {
        Kind::Int => Bind::Int(value.parse().map_err(|_| bad("expected an integer"))?),
        // Stored in milliseconds, and a second covers the thousand after it.
        Kind::Time => Bind::Int(
            value
                .parse::<i64>()
                .ok()
                .filter(|s| s.checked_mul(1000).and_then(|ms| ms.checked_add(1000)).is_some())
                .ok_or_else(|| bad("expected epoch seconds"))?,
        ),
        Kind::Bool => Bind::Int(match value {
            "true" | "1" | "yes" | "on" => 1,
            "false" | "0" | "no" | "off" => 0,
            _ => return Err(bad("expected true or false")),
        }),
        Kind::Text | Kind::Json if value.contains('\0') => return Err(bad("text must not contain NUL bytes")),
        Kind::Text | Kind::Json => Bind::Text(value.to_owned()),
    })
}

/// Appends the SQL of one filter to `clauses`, its values to `binds`.
fn filter_sql(spec: &Spec, filter: &Filter, clauses: &mut Vec<String>, binds: &mut Vec<Bind>) -> Result<(), DataError> {
    let field = field(spec, &filter.field)?;
    let placeholder = |bind: Bind, binds: &mut Vec<Bind>| {
        binds.push(bind);
        format!("${}", binds.len())
    };
    let column = field.sql;
    if filter.op == Op::Contains {
        // On JSON lists (tags, files) `contains` means "has this element"; on text, a substring.
        let mut parts = Vec::new();
        for value in &filter.values {
            let pattern = match field.kind {
                Kind::Json => format!("%{}%", Value::String(value.clone())),
                Kind::Text => format!("%{value}%"),
                _ => return Err(DataError::BadOperator(field.name.to_owned())),
            };
            parts.push(format!("{column} LIKE {}", placeholder(Bind::Text(pattern), binds)));
        }
        clauses.push(format!("({})", parts.join(" OR ")));
        return Ok(());
    }
    if field.kind == Kind::Json {
        return Err(DataError::BadOperator(field.name.to_owned()));
    }
    let values: Vec<Bind> = filter.values.iter().map(|v| parse_value(field, v)).collect::<Result<_, _>>()?;
    // Whole seconds in the API cover a range of milliseconds in the database.
    if field.kind == Kind::Time {
        for value in values {
            let Bind::Int(seconds) = value else { unreachable!("times parse as integers") };
            let (start, end) = (seconds * 1000, seconds * 1000 + 1000);
            let clause = match filter.op {
                Op::Eq | Op::In => {
                    format!(
                        "({column} >= {} AND {column} < {})",
                        placeholder(Bind::Int(start), binds),
                        placeholder(Bind::Int(end), binds)
                    )
                }
                Op::Ne | Op::NotIn => {
                    format!(
                        "({column} < {} OR {column} >= {})",
                        placeholder(Bind::Int(start), binds),
                        placeholder(Bind::Int(end), binds)
                    )
                }
                Op::Lt => format!("{column} < {}", placeholder(Bind::Int(start), binds)),
                Op::Le => format!("{column} < {}", placeholder(Bind::Int(end), binds)),
                Op::Gt => format!("{column} >= {}", placeholder(Bind::Int(end), binds)),
                Op::Ge => format!("{column} >= {}", placeholder(Bind::Int(start), binds)),
                Op::Contains => unreachable!("handled above"),
            };
            clauses.push(clause);
        }
        return Ok(());
    }
    let clause = match filter.op {
        Op::Eq | Op::In if values.len() == 1 => {
            format!("{column} = {}", placeholder(values.into_iter().next().expect("one value"), binds))
        }
        Op::Eq | Op::In => {
            let list: Vec<String> = values.into_iter().map(|v| placeholder(v, binds)).collect();
            format!("{column} IN ({})", list.join(", "))
        }
        Op::Ne | Op::NotIn => {
            let list: Vec<String> = values.into_iter().map(|v| placeholder(v, binds)).collect();
            format!("({column} IS NULL OR {column} NOT IN ({}))", list.join(", "))
        }
        op => {
            let Some(value) = values.into_iter().next() else {
                return Ok(());
            };
            let symbol = match op {
                Op::Lt => "<",
                Op::Le => "<=",
                Op::Gt => ">",
                Op::Ge => ">=",
                _ => unreachable!("the other operators are handled above"),
            };
            format!("{column} {symbol} {}", placeholder(value, binds))
        }
    };
    clauses.push(clause);
    Ok(())
}

fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for bind in binds {
        query = match bind {
            Bind::Int(i) => query.bind(*i),
            Bind::Text(s) => query.bind(s.as_str()),
        };
    }
    query
}

fn row_to_json(spec: &Spec, row: &AnyRow) -> Result<Map<String, Value>, DataError> {
    let mut object = Map::new();
    for (i, field) in spec.fields.iter().enumerate() {
        let value = match field.kind {
            Kind::Int => row.try_get::<Option<i64>, _>(i)?.map_or(Value::Null, Value::from),
            Kind::Time => row.try_get::<Option<i64>, _>(i)?.map_or(Value::Null, |ms| Value::from(ms.div_euclid(1000))),
            Kind::Bool => Value::Bool(row.try_get::<Option<i64>, _>(i)?.unwrap_or(0) != 0),
            Kind::Text => row.try_get::<Option<String>, _>(i)?.map_or(Value::Null, Value::String),
            Kind::Json => match row.try_get::<Option<String>, _>(i)? {
                Some(text) => serde_json::from_str(&text).unwrap_or(Value::Null),
                None => Value::Null,
            },
        };
        object.insert(field.name.to_owned(), value);
    }
    Ok(object)
}

/// The SQL of one list query, built before any of it reaches the database: the statement, the
/// statement counting all matches when a page is asked for, and the values bound to both.
#[derive(Debug)]
pub struct Select {
    pub sql: String,
    pub count_sql: Option<String>,
    binds: Vec<Bind>,
}

impl Select {
    /// Translates a query of the data API into SQL; a field, operator or value the resource does
    /// not have is the client's mistake.
    pub fn new(resource: Resource, query: &ListQuery) -> Result<Select, DataError> {
        let spec = resource.spec();
        let mut clauses = Vec::new();
        let mut binds = Vec::new();
        for filter in &query.filters {
            filter_sql(spec, filter, &mut clauses, &mut binds)?;
        }
        let where_sql = if clauses.is_empty() { String::new() } else { format!(" WHERE {}", clauses.join(" AND ")) };
        let mut order = Vec::new();
        for item in &query.order {
            let (name, direction) = match item.strip_prefix('-') {
                Some(name) => (name, "DESC"),
                None => (item.as_str(), "ASC"),
            };
            let sql = field(spec, name)?.sql;
            // A field Kiln reports as a constant (such as `locks_duration_s`) orders nothing; a
            // number in ORDER BY would name a column position instead.
            if sql.parse::<i64>().is_ok() {
                continue;
            }
            order.push(format!("{sql} {direction}"));
        }
        order.push(format!("{} ASC", spec.key));
        let columns: Vec<&str> = spec.fields.iter().map(|f| f.sql).collect();
        let mut sql =
            format!("SELECT {} FROM {}{where_sql} ORDER BY {}", columns.join(", "), spec.from, order.join(", "));
        // LIMIT and OFFSET are validated integers, so they are written inline.
        match query.limit {
            Some(limit) => sql.push_str(&format!(" LIMIT {} OFFSET {}", limit.max(0), query.offset.max(0))),
            None if query.offset > 0 => sql.push_str(&format!(" LIMIT {} OFFSET {}", i64::MAX, query.offset)),
            None => {}
        }
        let count_sql = (query.limit.is_some() || query.offset != 0)
            .then(|| format!("SELECT COUNT(*) AS n FROM {}{where_sql}", spec.from));
        Ok(Select { sql, count_sql, binds })
    }

    /// How many values the statements bind (`$1` … `$n`).
    pub fn bind_count(&self) -> usize {
        self.binds.len()
    }
}

pub(super) async fn list(
    pool: &AnyPool,
    resource: Resource,
    query: &ListQuery,
) -> Result<(Vec<Value>, i64), DataError> {
    let spec = resource.spec();
    let select = Select::new(resource, query)?;
    let rows = bind_all(sqlx::query(AssertSqlSafe(select.sql)), &select.binds).fetch_all(pool).await?;
    let total = match select.count_sql {
        None => rows.len() as i64,
        Some(count_sql) => {
            let row = bind_all(sqlx::query(AssertSqlSafe(count_sql)), &select.binds).fetch_one(pool).await?;
            row.try_get::<i64, _>("n")?
        }
    };
    let mut objects = Vec::with_capacity(rows.len());
    for row in &rows {
        objects.push(row_to_json(spec, row)?);
    }
    embed(pool, resource, &mut objects).await?;
    Ok((objects.into_iter().map(Value::Object).collect(), total))
}

/// Objects related to another through tables the collections do not show: what the REST paths
/// `changes/N/builds`, `builds/N/changes` and `builds/N/triggered_builds` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Related {
    /// The builds of the buildsets that build a change's source stamp.
    BuildsOfChange,
    /// The changes of the source stamps a build built.
    ChangesOfBuild,
    /// The builds of buildsets a build triggered.
    TriggeredBuilds,
}

/// The ids of the objects related to `id`, in id order.
pub(super) async fn related(pool: &AnyPool, relation: Related, id: i64) -> Result<Vec<i64>, DataError> {
    let sql = match relation {
        Related::BuildsOfChange => {
            "SELECT DISTINCT b.id FROM builds b JOIN buildrequests r ON r.id = b.buildrequestid \
             JOIN buildset_sourcestamps bs ON bs.buildsetid = r.buildsetid \
             JOIN changes c ON c.sourcestampid = bs.sourcestampid WHERE c.changeid = $1 ORDER BY b.id"
        }
        Related::ChangesOfBuild => {
            "SELECT DISTINCT c.changeid AS id FROM changes c \
             JOIN buildset_sourcestamps bs ON bs.sourcestampid = c.sourcestampid \
             JOIN buildrequests r ON r.buildsetid = bs.buildsetid \
             JOIN builds b ON b.buildrequestid = r.id WHERE b.id = $1 ORDER BY c.changeid"
        }
        Related::TriggeredBuilds => {
            "SELECT b.id FROM builds b JOIN buildrequests r ON r.id = b.buildrequestid \
             JOIN buildsets s ON s.id = r.buildsetid WHERE s.parent_buildid = $1 ORDER BY b.id"
        }
    };
    let rows = sqlx::query(sql).bind(id).fetch_all(pool).await?;
    Ok(rows.iter().map(|r| r.try_get::<i64, _>("id")).collect::<Result<_, _>>()?)
}

/// A buildset's properties, `{name: [value, source]}`; `None` for an unknown buildset.
pub(super) async fn buildset_properties(pool: &AnyPool, bsid: i64) -> Result<Option<Value>, DataError> {
    let row = sqlx::query("SELECT properties FROM buildsets WHERE id = $1").bind(bsid).fetch_optional(pool).await?;
    let Some(row) = row else { return Ok(None) };
    let text: String = row.try_get("properties")?;
    Ok(Some(serde_json::from_str(&text).unwrap_or_else(|_| json!({}))))
}

/// Adds the fields Buildbot embeds from other tables.
async fn embed(pool: &AnyPool, resource: Resource, objects: &mut [Map<String, Value>]) -> Result<(), DataError> {
    match resource {
        Resource::Builders => {
            let rows = sqlx::query("SELECT id FROM masters WHERE active = 1 ORDER BY id").fetch_all(pool).await?;
            let masterids: Vec<Value> =
                rows.iter().map(|r| r.try_get::<i64, _>("id").map(Value::from)).collect::<Result<_, _>>()?;
            for object in objects {
                object.insert("masterids".into(), Value::Array(masterids.clone()));
                object.insert("description_format".into(), Value::Null);
                object.insert("description_html".into(), Value::Null);
                object.insert("projectid".into(), Value::Null);
            }
        }
        Resource::Buildsets => {
            for object in objects {
                let bsid = object.get("bsid").and_then(Value::as_i64).unwrap_or(0);
                let rows = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {} FROM sourcestamps WHERE id IN (SELECT sourcestampid FROM buildset_sourcestamps WHERE buildsetid = $1) ORDER BY id",
                    SOURCESTAMPS.fields.iter().map(|f| f.sql).collect::<Vec<_>>().join(", ")
                )))
                .bind(bsid)
                .fetch_all(pool)
                .await?;
                let mut stamps = Vec::new();
                for row in &rows {
                    let mut ss = row_to_json(&SOURCESTAMPS, row)?;
                    ss.insert("patch".into(), Value::Null);
                    stamps.push(Value::Object(ss));
                }
                object.insert("sourcestamps".into(), Value::Array(stamps));
            }
        }
        Resource::Changes => {
            for object in objects {
                let ssid = object.get("sourcestampid").and_then(Value::as_i64).unwrap_or(0);
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {} FROM sourcestamps WHERE id = $1",
                    SOURCESTAMPS.fields.iter().map(|f| f.sql).collect::<Vec<_>>().join(", ")
                )))
                .bind(ssid)
                .fetch_optional(pool)
                .await?;
                let ss = match row {
                    Some(row) => {
                        let mut ss = row_to_json(&SOURCESTAMPS, &row)?;
                        ss.insert("patch".into(), Value::Null);
                        Value::Object(ss)
                    }
                    None => Value::Null,
                };
                object.insert("sourcestamp".into(), ss);
                object.insert("parent_changeids".into(), json!([]));
            }
        }
        Resource::SourceStamps => {
            for object in objects {
                object.insert("patch".into(), Value::Null);
            }
        }
        Resource::Schedulers => {
            // Every master runs every scheduler and state in the database decides who acts, so a
            // scheduler is shown on the longest-serving active master (none when all stopped).
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {} FROM masters WHERE active = 1 ORDER BY id LIMIT 1",
                MASTERS.fields.iter().map(|f| f.sql).collect::<Vec<_>>().join(", ")
            )))
            .fetch_optional(pool)
            .await?;
            let master = match row {
                Some(row) => Value::Object(row_to_json(&MASTERS, &row)?),
                None => Value::Null,
            };
            for object in objects {
                object.insert("master".into(), master.clone());
            }
        }
        Resource::Workers => {
            for object in objects {
                let connected = match object.remove("connected_masterid") {
                    Some(Value::Number(id)) => json!([{ "masterid": id }]),
                    _ => json!([]),
                };
                object.insert("connected_to".into(), connected);
            }
        }
        _ => {}
    }
    Ok(())
}
