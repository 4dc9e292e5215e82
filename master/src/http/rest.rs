//! The read side of Buildbot's REST data API v2: path → resource and filters, Buildbot's query
//! parameters, and the `{"<plural>": [...], "meta": {...}}` envelope.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::ApiError;
use crate::config::SchedulerConfig;
use crate::master::Master;
use crate::store::{Filter, ListQuery, Op, Related, Resource};

pub async fn root() -> Json<Value> {
    // Every collection the data API serves: the stored ones, the force schedulers of the
    // configuration, and Kiln's pools.
    let names: Vec<&str> = Resource::ALL.iter().map(|r| r.plural()).chain(["forceschedulers", "pools"]).collect();
    let links: Vec<Value> = names.iter().map(|n| json!({ "name": n })).collect();
    Json(json!({ "rootlinks": links, "meta": { "total": names.len() } }))
}

/// What a path names.
enum Target {
    Collection(Resource, Vec<Filter>),
    Single(Resource, Vec<Filter>),
    LogContents(i64),
    LogRaw {
        logid: i64,
        inline: bool,
    },
    ForceSchedulers {
        name: Option<String>,
        builder: Option<String>,
    },
    /// A properties endpoint: one object of `{name: [value, source]}`.
    Properties(Value),
    /// A collection known to be empty (Kiln keeps no projects or test results yet).
    Empty(&'static str),
    ChangeSources(Option<i64>),
    /// `application.spec`: the endpoints Kiln serves, with their objects' fields.
    Spec,
}

/// The objects of `resource` whose ids are `ids`.
fn among(resource: Resource, field: &str, ids: Vec<i64>) -> Target {
    if ids.is_empty() {
        return Target::Empty(resource.plural());
    }
    Target::Collection(
        resource,
        vec![Filter { field: field.to_owned(), op: Op::In, values: ids.iter().map(i64::to_string).collect() }],
    )
}

fn eq(field: &str, value: impl ToString) -> Filter {
    Filter { field: field.to_owned(), op: Op::Eq, values: vec![value.to_string()] }
}

fn number(text: &str) -> Result<i64, ApiError> {
    text.parse().map_err(|_| ApiError::NotFound(format!("no such id {text:?}")))
}

/// A filter selecting an object by its numeric id or its name.
fn id_or_name(id_field: &str, text: &str) -> Filter {
    match text.parse::<i64>() {
        Ok(id) => eq(id_field, id),
        Err(_) => eq("name", text),
    }
}

async fn one(master: &Master, resource: Resource, filters: Vec<Filter>) -> Result<Map<String, Value>, ApiError> {
    let query = ListQuery { filters, limit: Some(1), ..Default::default() };
    let (mut objects, _) = master.store.list(resource, &query).await?;
    match objects.pop() {
        Some(Value::Object(object)) => Ok(object),
        _ => Err(ApiError::NotFound(format!("not found while getting from endpoint for {}", resource.plural()))),
    }
}

async fn id_of(master: &Master, resource: Resource, filters: Vec<Filter>, field: &str) -> Result<i64, ApiError> {
    one(master, resource, filters)
        .await?
        .get(field)
        .and_then(Value::as_i64)
        .ok_or_else(|| ApiError::NotFound(resource.plural().to_owned()))
}

async fn resolve(master: &Master, path: &[&str]) -> Result<Target, ApiError> {
    use Resource::*;
    use Target::{Collection, Single};
    Ok(match path {
        ["builders"] => Collection(Builders, vec![]),
        ["builders", b] => Single(Builders, vec![id_or_name("builderid", b)]),
        ["builders", b, "builds"] => Collection(Builds, vec![eq("builderid", builder_id(master, b).await?)]),
        ["builders", b, "buildrequests"] => {
            Collection(BuildRequests, vec![eq("builderid", builder_id(master, b).await?)])
        }
        ["builders", b, "workers"] => {
            builder_id(master, b).await?;
            Collection(Workers, vec![])
        }
        ["builders", b, "masters"] => {
            builder_id(master, b).await?;
            Collection(Masters, vec![eq("active", 1)])
        }
        ["builders", b, "forceschedulers"] => {
            let object = one(master, Builders, vec![id_or_name("builderid", b)]).await?;
            let name = object.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            Target::ForceSchedulers { name: None, builder: Some(name) }
        }
        ["builders", b, "builds", n, rest @ ..] => {
            let builderid = builder_id(master, b).await?;
            let buildid =
                id_of(master, Builds, vec![eq("builderid", builderid), eq("number", number(n)?)], "buildid").await?;
            return Box::pin(resolve_build(master, buildid, rest)).await;
        }
        ["builds"] => Collection(Builds, vec![]),
        ["builds", id, rest @ ..] => {
            return Box::pin(resolve_build(master, number(id)?, rest)).await;
        }
        ["buildrequests"] => Collection(BuildRequests, vec![]),
        ["buildrequests", id] => Single(BuildRequests, vec![eq("buildrequestid", number(id)?)]),
        ["buildrequests", id, "properties"] => {
            // A request's properties are its buildset's.
            let bsid = id_of(master, BuildRequests, vec![eq("buildrequestid", number(id)?)], "buildsetid").await?;
            match master.store.buildset_properties(bsid).await? {
                Some(properties) => Target::Properties(properties),
                None => return Err(ApiError::NotFound(format!("no buildset {bsid}"))),
            }
        }
        ["buildrequests", id, "builds"] => Collection(Builds, vec![eq("buildrequestid", number(id)?)]),
        ["buildsets"] => Collection(Buildsets, vec![]),
        ["buildsets", id] => Single(Buildsets, vec![eq("bsid", number(id)?)]),
        ["buildsets", id, "properties"] => match master.store.buildset_properties(number(id)?).await? {
            Some(properties) => Target::Properties(properties),
            None => return Err(ApiError::NotFound(format!("no buildset {id}"))),
        },
        ["changes"] => Collection(Changes, vec![]),
        ["changes", id] => Single(Changes, vec![eq("changeid", number(id)?)]),
        ["changes", id, "builds"] => {
            let changeid = id_of(master, Changes, vec![eq("changeid", number(id)?)], "changeid").await?;
            among(Builds, "buildid", master.store.related(Related::BuildsOfChange, changeid).await?)
        }
        ["sourcestamps"] => Collection(SourceStamps, vec![]),
        ["sourcestamps", id] => Single(SourceStamps, vec![eq("ssid", number(id)?)]),
        ["sourcestamps", id, "changes"] => Collection(Changes, vec![eq("sourcestampid", number(id)?)]),
        ["workers"] => Collection(Workers, vec![]),
        ["workers", w] => Single(Workers, vec![id_or_name("workerid", w)]),
        ["workers", w, "builds"] => {
            let workerid = id_of(master, Workers, vec![id_or_name("workerid", w)], "workerid").await?;
            Collection(Builds, vec![eq("workerid", workerid)])
        }
        ["workers", w, "builders"] => {
            let worker = one(master, Workers, vec![id_or_name("workerid", w)]).await?;
            let mut ids: Vec<i64> = worker
                .get("configured_on")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("builderid").and_then(Value::as_i64))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            among(Builders, "builderid", ids)
        }
        ["schedulers"] => Collection(Schedulers, vec![]),
        ["schedulers", id] => Single(Schedulers, vec![eq("schedulerid", number(id)?)]),
        ["masters"] => Collection(Masters, vec![]),
        ["masters", id] => Single(Masters, vec![eq("masterid", number(id)?)]),
        ["masters", id, "builders"] => {
            // Every active master serves every builder.
            let masterid = number(id)?;
            let active = one(master, Masters, vec![eq("masterid", masterid)]).await?;
            if active.get("active") == Some(&Value::Bool(true)) {
                Collection(Builders, vec![])
            } else {
                Target::Empty("builders")
            }
        }
        ["masters", id, "workers"] => {
            let masterid = id_of(master, Masters, vec![eq("masterid", number(id)?)], "masterid").await?;
            Collection(Workers, vec![eq("connected_masterid", masterid)])
        }
        ["masters", id, "schedulers"] => {
            let masterid = id_of(master, Masters, vec![eq("masterid", number(id)?)], "masterid").await?;
            // Schedulers are shown on the longest-serving active master (see the store).
            let first = ListQuery { filters: vec![eq("active", 1)], limit: Some(1), ..Default::default() };
            let (first, _) = master.store.list(Masters, &first).await?;
            let shown_here = first.first().and_then(|m| m.get("masterid")).and_then(Value::as_i64) == Some(masterid);
            if shown_here { Collection(Schedulers, vec![]) } else { Target::Empty("schedulers") }
        }
        ["changesources"] => Target::ChangeSources(None),
        ["changesources", id] => Target::ChangeSources(Some(number(id)?)),
        ["projects"] => Target::Empty("projects"),
        ["test_result_sets"] => Target::Empty("test_result_sets"),
        ["application.spec"] => Target::Spec,
        ["steps", id, rest @ ..] => return Box::pin(resolve_step(master, number(id)?, rest)).await,
        ["logs", id, rest @ ..] => return resolve_log(number(id)?, rest),
        ["forceschedulers"] => Target::ForceSchedulers { name: None, builder: None },
        ["forceschedulers", name] => Target::ForceSchedulers { name: Some((*name).to_owned()), builder: None },
        _ => {
            return Err(ApiError::NotFound(format!("no endpoint for /{}", path.join("/"))));
        }
    })
}

async fn builder_id(master: &Master, text: &str) -> Result<i64, ApiError> {
    id_of(master, Resource::Builders, vec![id_or_name("builderid", text)], "builderid").await
}

async fn resolve_build(master: &Master, buildid: i64, rest: &[&str]) -> Result<Target, ApiError> {
    Ok(match rest {
        [] => Target::Single(Resource::Builds, vec![eq("buildid", buildid)]),
        ["properties"] => {
            let build = one(master, Resource::Builds, vec![eq("buildid", buildid)]).await?;
            Target::Properties(build.get("properties").cloned().unwrap_or_else(|| json!({})))
        }
        ["changes"] => {
            let buildid = id_of(master, Resource::Builds, vec![eq("buildid", buildid)], "buildid").await?;
            among(Resource::Changes, "changeid", master.store.related(Related::ChangesOfBuild, buildid).await?)
        }
        ["triggered_builds"] => {
            let buildid = id_of(master, Resource::Builds, vec![eq("buildid", buildid)], "buildid").await?;
            among(Resource::Builds, "buildid", master.store.related(Related::TriggeredBuilds, buildid).await?)
        }
        ["test_result_sets"] => {
            id_of(master, Resource::Builds, vec![eq("buildid", buildid)], "buildid").await?;
            Target::Empty("test_result_sets")
        }
        ["steps"] => Target::Collection(Resource::Steps, vec![eq("buildid", buildid)]),
        ["steps", step, rest @ ..] => {
            let by = match step.parse::<i64>() {
                Ok(n) => eq("number", n),
                Err(_) => eq("name", step),
            };
            let stepid = id_of(master, Resource::Steps, vec![eq("buildid", buildid), by], "stepid").await?;
            return Box::pin(resolve_step(master, stepid, rest)).await;
        }
        _ => return Err(ApiError::NotFound("no such build endpoint".into())),
    })
}

async fn resolve_step(master: &Master, stepid: i64, rest: &[&str]) -> Result<Target, ApiError> {
    Ok(match rest {
        [] => Target::Single(Resource::Steps, vec![eq("stepid", stepid)]),
        ["logs"] => Target::Collection(Resource::Logs, vec![eq("stepid", stepid)]),
        ["logs", slug, rest @ ..] => {
            let logid = id_of(master, Resource::Logs, vec![eq("stepid", stepid), eq("slug", slug)], "logid").await?;
            return resolve_log(logid, rest);
        }
        _ => return Err(ApiError::NotFound("no such step endpoint".into())),
    })
}

fn resolve_log(logid: i64, rest: &[&str]) -> Result<Target, ApiError> {
    Ok(match rest {
        [] => Target::Single(Resource::Logs, vec![eq("logid", logid)]),
        ["contents"] => Target::LogContents(logid),
        ["raw"] => Target::LogRaw { logid, inline: false },
        ["raw_inline"] => Target::LogRaw { logid, inline: true },
        _ => return Err(ApiError::NotFound("no such log endpoint".into())),
    })
}

/// Buildbot's query parameters, decoded.
#[derive(Default, Clone)]
pub(crate) struct Params {
    pub fields: Vec<String>,
    pub properties: Vec<String>,
    pub query: ListQuery,
}

pub(crate) fn parse_params(
    resource: Option<Resource>,
    pairs: Vec<(String, String)>,
    single: bool,
) -> Result<Params, ApiError> {
    let mut params = Params::default();
    let unrecognized = |name: &str| ApiError::BadRequest(format!("unrecognized query parameter '{name}'"));
    let integer = |name: &str, value: &str| {
        value
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::BadRequest(format!("invalid {name} value {value:?}: expected a whole number")))
    };
    for (name, value) in pairs {
        match name.as_str() {
            "field" => {
                for field in value.split(',').filter(|f| !f.is_empty()) {
                    if let Some(resource) = resource
                        && !resource.has_field(field)
                    {
                        return Err(ApiError::BadRequest(format!("no such field '{field}'")));
                    }
                    params.fields.push(field.to_owned());
                }
            }
            "property" => params.properties.push(value),
            "order" if !single => params.query.order.push(value),
            "limit" if !single => params.query.limit = Some(integer("limit", &value)?),
            "offset" if !single => params.query.offset = integer("offset", &value)?,
            _ if single => return Err(unrecognized(&name)),
            _ => {
                let Some(resource) = resource else {
                    return Err(unrecognized(&name));
                };
                let (field, op) = match name.split_once("__") {
                    Some((field, op)) => (field, Op::parse(op).ok_or_else(|| unrecognized(&name))?),
                    None => (name.as_str(), Op::Eq),
                };
                if !resource.has_field(field) {
                    return Err(unrecognized(&name));
                }
                // A repeated equality means "any of these", as in Buildbot.
                match params
                    .query
                    .filters
                    .iter_mut()
                    .find(|f| f.field == field && f.op == op && matches!(op, Op::Eq | Op::In | Op::NotIn))
                {
                    Some(existing) => existing.values.push(value),
                    None => params.query.filters.push(Filter { field: field.to_owned(), op, values: vec![value] }),
                }
            }
        }
    }
    Ok(params)
}

/// Applies `field=` and `property=` to one object.
pub(crate) fn shape(resource: Resource, mut object: Map<String, Value>, params: &Params) -> Value {
    if resource == Resource::Builds || resource == Resource::BuildRequests {
        let all = object.remove("properties").unwrap_or(Value::Null);
        let selected = if params.properties.is_empty() {
            if resource == Resource::Builds { json!({}) } else { Value::Null }
        } else {
            let wanted = |name: &str| params.properties.iter().any(|p| p == "*" || p == name);
            match all {
                Value::Object(map) => Value::Object(map.into_iter().filter(|(k, _)| wanted(k)).collect()),
                _ => json!({}),
            }
        };
        object.insert("properties".into(), selected);
    }
    if !params.fields.is_empty() {
        object.retain(|k, _| params.fields.iter().any(|f| f == k));
    }
    Value::Object(object)
}

fn envelope(key: &str, items: Vec<Value>, meta: Value) -> Response {
    let mut body = Map::new();
    body.insert(key.to_owned(), Value::Array(items));
    body.insert("meta".into(), meta);
    Json(Value::Object(body)).into_response()
}

pub async fn get(
    State(master): State<Arc<Master>>,
    Path(path): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match resolve(&master, &segments).await? {
        Target::Collection(resource, filters) => {
            let mut params = parse_params(Some(resource), pairs, false)?;
            params.query.filters.extend(filters);
            if params.query.limit.is_none_or(|limit| limit > PAGE) {
                return stream_collection(master, resource, params).await;
            }
            let (objects, total) = master.store.list(resource, &params.query).await?;
            let items = objects
                .into_iter()
                .map(|o| match o {
                    Value::Object(map) => shape(resource, map, &params),
                    other => other,
                })
                .collect();
            Ok(envelope(resource.plural(), items, json!({ "total": total })))
        }
        Target::Single(resource, filters) => {
            let params = parse_params(Some(resource), pairs, true)?;
            let object = one(&master, resource, filters).await?;
            Ok(envelope(resource.plural(), vec![shape(resource, object, &params)], json!({})))
        }
        Target::LogContents(logid) => {
            let mut offset = 0;
            let mut limit = None;
            for (name, value) in pairs {
                let parsed = value.parse::<i64>().ok().filter(|n| *n >= 0);
                match (name.as_str(), parsed) {
                    ("offset", Some(n)) => offset = n,
                    ("limit", Some(n)) => limit = Some(n),
                    ("offset" | "limit", None) => {
                        return Err(ApiError::BadRequest(format!("invalid {name} value {value:?}")));
                    }
                    _ => {
                        return Err(ApiError::BadRequest(format!("unrecognized query parameter '{name}'")));
                    }
                }
            }
            one(&master, Resource::Logs, vec![eq("logid", logid)]).await?;
            let content = master.store.log_lines(logid, offset, limit).await?;
            let chunk = json!({ "logid": logid, "firstline": offset, "content": content });
            Ok(envelope("logchunks", vec![chunk], json!({})))
        }
        Target::LogRaw { logid, inline } => log_raw(&master, logid, inline).await,
        Target::ForceSchedulers { name, builder } => {
            let params = parse_params(None, pairs, name.is_some())?;
            let items: Vec<Value> = master
                .config
                .schedulers
                .iter()
                .filter_map(|s| match s {
                    SchedulerConfig::Force(f) => {
                        let wanted = name.as_ref().is_none_or(|x| *x == f.name)
                            && builder.as_ref().is_none_or(|b| f.builder_names.contains(b));
                        wanted.then(|| force_scheduler_json(f))
                    }
                    _ => None,
                })
                .collect();
            if name.is_some() && items.is_empty() {
                return Err(ApiError::NotFound("no such force scheduler".into()));
            }
            let _ = params;
            let total = items.len();
            Ok(envelope("forceschedulers", items, if name.is_some() { json!({}) } else { json!({ "total": total }) }))
        }
        Target::Properties(properties) => {
            parse_params(None, pairs, true)?;
            Ok(envelope("properties", vec![properties], json!({ "total": 1 })))
        }
        Target::Empty(key) => {
            match Resource::from_plural(key) {
                Some(resource) => parse_params(Some(resource), pairs, false)?,
                None => parse_params(None, without_filters_on(unkept_fields(key), pairs)?, false)?,
            };
            Ok(envelope(key, Vec::new(), json!({ "total": 0 })))
        }
        Target::ChangeSources(id) => {
            parse_params(None, pairs, id.is_some())?;
            let first_master = ListQuery { filters: vec![eq("active", 1)], limit: Some(1), ..Default::default() };
            let (masters, _) = master.store.list(Resource::Masters, &first_master).await?;
            let shown_on = masters.into_iter().next().unwrap_or(Value::Null);
            let items: Vec<Value> = master
                .config
                .change_sources
                .iter()
                .enumerate()
                .map(|(i, source)| {
                    let crate::config::ChangeSourceConfig::GitPoller(poller) = source;
                    let name = poller.name.clone().unwrap_or_else(|| poller.repourl.clone());
                    json!({ "changesourceid": i + 1, "name": format!("GitPoller:{name}"), "master": shown_on })
                })
                .filter(|source| id.is_none_or(|id| source["changesourceid"] == id))
                .collect();
            match id {
                Some(_) if items.is_empty() => Err(ApiError::NotFound("no such change source".into())),
                Some(_) => Ok(envelope("changesources", items, json!({}))),
                None => {
                    let total = items.len();
                    Ok(envelope("changesources", items, json!({ "total": total })))
                }
            }
        }
        Target::Spec => {
            parse_params(None, pairs, false)?;
            let specs = application_spec();
            let total = specs.len();
            Ok(envelope("specs", specs, json!({ "total": total })))
        }
    }
}

/// Rows read from the database per page of a streamed collection.
const PAGE: i64 = 500;

/// Serves a collection too large to hold in memory: the envelope is written page by page, so
/// memory is bounded by one page however many objects match.
async fn stream_collection(master: Arc<Master>, resource: Resource, params: Params) -> Result<Response, ApiError> {
    let wanted = params.query.limit;
    let start = params.query.offset;
    let mut first_query = params.query.clone();
    first_query.limit = Some(wanted.map_or(PAGE, |w| w.min(PAGE)));
    // The first page is read before answering, so a bad query still gets its 400.
    let (first, total) = master.store.list(resource, &first_query).await?;
    let end = wanted.map_or(total, |w| (start + w).min(total));
    let head = format!("{{\"{}\":[", resource.plural());
    let tail = format!("],\"meta\":{{\"total\":{total}}}}}");
    struct Pager {
        master: Arc<Master>,
        resource: Resource,
        params: Params,
        next_offset: i64,
        end: i64,
        page: Option<Vec<Value>>,
        wrote_any: bool,
        done: bool,
    }
    let read = first.len() as i64;
    let pager = Pager {
        next_offset: start + read,
        page: Some(first),
        wrote_any: false,
        done: false,
        end,
        master,
        resource,
        params,
    };
    let body = futures::stream::unfold(pager, |mut pager| async move {
        if pager.done {
            return None;
        }
        let page = match pager.page.take() {
            Some(page) => page,
            None if pager.next_offset >= pager.end => {
                pager.done = true;
                return Some((Ok::<_, std::io::Error>(Vec::new()), pager));
            }
            None => {
                let mut query = pager.params.query.clone();
                query.offset = pager.next_offset;
                query.limit = Some(PAGE.min(pager.end - pager.next_offset));
                match pager.master.store.list(pager.resource, &query).await {
                    Ok((rows, _)) if rows.is_empty() => {
                        pager.done = true;
                        return Some((Ok(Vec::new()), pager));
                    }
                    Ok((rows, _)) => {
                        pager.next_offset += rows.len() as i64;
                        rows
                    }
                    Err(error) => {
                        tracing::error!(%error, "a streamed collection failed part way");
                        return Some((Err(std::io::Error::other("database error")), pager));
                    }
                }
            }
        };
        let mut chunk = Vec::new();
        for object in page {
            let shaped = match object {
                Value::Object(map) => shape(pager.resource, map, &pager.params),
                other => other,
            };
            if pager.wrote_any {
                chunk.push(b',');
            }
            pager.wrote_any = true;
            chunk.extend(serde_json::to_vec(&shaped).unwrap_or_default());
        }
        Some((Ok(chunk), pager))
    });
    let body = futures::stream::once(async move { Ok(head.into_bytes()) })
        .chain(body)
        .chain(futures::stream::once(async move { Ok(tail.into_bytes()) }));
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], axum::body::Body::from_stream(body))
        .into_response())
}

/// A force scheduler as Buildbot describes its form: the name, reason and priority in one
/// group, one group per codebase (its fields named `<codebase>_branch` …), then the scheduler's
/// own parameters.
fn force_scheduler_json(force: &crate::config::ForceSchedulerConfig) -> Value {
    let field = |name: &str, full_name: &str, label: &str, kind: &str, default: Value, required: bool| {
        json!({ "name": name, "fullName": full_name, "label": label, "tablabel": label, "type": kind,
                "default": default, "required": required, "hide": false, "multiple": false, "regex": null,
                "maxsize": null, "autopopulate": null, "tooltip": "", "size": 10 })
    };
    let group = |name: &str, label: &str, fields: Vec<Value>| {
        let mut group = field(name, name, label, "nested", json!(""), false);
        group["fields"] = Value::Array(fields);
        group["columns"] = json!(1);
        group["layout"] = json!("vertical");
        group
    };
    let mut fields = vec![group(
        "",
        "",
        vec![
            field("username", "username", "Your name:", "username", json!(""), false),
            field("reason", "reason", "reason", "text", json!("force build"), false),
            field("priority", "priority", "Priority:", "int", json!(0), false),
        ],
    )];
    for codebase in &force.codebases {
        let prefix = if codebase.is_empty() { String::new() } else { format!("{codebase}_") };
        let label = if codebase.is_empty() { String::new() } else { format!("Codebase: {codebase}") };
        let inner =
            [("branch", "Branch:"), ("revision", "Revision:"), ("repository", "Repository:"), ("project", "Project:")]
                .into_iter()
                .map(|(name, label)| field(name, &format!("{prefix}{name}"), label, "text", json!(""), false))
                .collect();
        fields.push(group(codebase, &label, inner));
    }
    for parameter in &force.parameters {
        let label = parameter.label.clone().unwrap_or_else(|| parameter.name.clone());
        let default = parameter.default.clone().unwrap_or(Value::Null);
        let mut entry = field(
            &parameter.name,
            &parameter.name,
            &label,
            parameter.kind.buildbot_type(),
            default,
            parameter.required,
        );
        if !parameter.choices.is_empty() {
            entry["choices"] = json!(parameter.choices);
        }
        if let Some(pattern) = &parameter.regex {
            entry["regex"] = json!(pattern);
        }
        fields.push(entry);
    }
    let label = force.label.clone().unwrap_or_else(|| force.name.clone());
    json!({
        "name": force.name,
        "builder_names": force.builder_names,
        "button_name": force.button_name.clone().unwrap_or_else(|| label.clone()),
        "label": label,
        "enabled": true,
        "all_fields": fields,
    })
}

async fn log_raw(master: &Master, logid: i64, inline: bool) -> Result<Response, ApiError> {
    let log = one(master, Resource::Logs, vec![eq("logid", logid)]).await?;
    let stepid = log.get("stepid").and_then(Value::as_i64).unwrap_or(0);
    let step = one(master, Resource::Steps, vec![eq("stepid", stepid)]).await?;
    let buildid = step.get("buildid").and_then(Value::as_i64).unwrap_or(0);
    let build = one(master, Resource::Builds, vec![eq("buildid", buildid)]).await?;
    let builderid = build.get("builderid").and_then(Value::as_i64).unwrap_or(0);
    let builder = one(master, Resource::Builders, vec![eq("builderid", builderid)]).await?;
    let worker_name = match build.get("workerid").and_then(Value::as_i64) {
        Some(workerid) => one(master, Resource::Workers, vec![eq("workerid", workerid)])
            .await
            .ok()
            .and_then(|w| w.get("name").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default(),
        None => String::new(),
    };
    let text = |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let number = build.get("number").and_then(Value::as_i64).unwrap_or(0);
    let stored = master.store.log_lines(logid, 0, None).await?;
    let body = if text(&log, "type") == "s" {
        // Drop the one-letter channel prefix of each stdio line.
        stored.split_inclusive('\n').map(|line| line.get(1..).unwrap_or_default()).collect::<String>()
    } else {
        stored
    };
    let header_lines =
        format!("Builder: {}\nBuild number: {number}\nWorker name: {worker_name}\n", text(&builder, "name"));
    let filename =
        format!("{}_build_{number}_step_{}_log_{}", text(&builder, "name"), text(&step, "name"), text(&log, "slug"));
    let disposition =
        if inline { "inline".to_owned() } else { format!("attachment; filename=\"{}\"", filename.replace('"', "")) };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()), (header::CONTENT_DISPOSITION, disposition)],
        format!("{header_lines}{body}"),
    )
        .into_response())
}

/// The fields of Buildbot's resource types that Kiln keeps none of yet, so that the UI's filters on
/// their (empty) lists are accepted.
fn unkept_fields(plural: &str) -> &'static [&'static str] {
    match plural {
        "projects" => &["projectid", "name", "slug", "description", "description_format", "description_html", "active"],
        "test_result_sets" => &[
            "test_result_setid",
            "builderid",
            "buildid",
            "stepid",
            "description",
            "category",
            "value_unit",
            "tests_passed",
            "tests_failed",
            "complete",
        ],
        _ => &[],
    }
}

/// The query without its filters on `fields` (an `__op` suffix included), which on an empty list
/// select nothing more; a filter with an unknown operator is still refused.
fn without_filters_on(fields: &[&str], pairs: Vec<(String, String)>) -> Result<Vec<(String, String)>, ApiError> {
    let mut kept = Vec::new();
    for (name, value) in pairs {
        let (field, op) = match name.split_once("__") {
            Some((field, op)) => (field, Some(op)),
            None => (name.as_str(), None),
        };
        if !fields.contains(&field) {
            kept.push((name, value));
        } else if op.is_some_and(|op| Op::parse(op).is_none()) {
            return Err(ApiError::BadRequest(format!("unrecognized query parameter '{name}'")));
        }
    }
    Ok(kept)
}

/// The endpoints Kiln serves, as `application.spec` lists them: Buildbot's path pattern (`n:`
/// an integer, `i:` an identifier), the type and collection of what it answers.
const ENDPOINTS: &[(&str, &str, &str)] = &[
    ("builders", "builder", "builders"),
    ("builders/i:buildername", "builder", "builders"),
    ("builders/n:builderid", "builder", "builders"),
    ("builders/n:builderid/builds", "build", "builds"),
    ("builders/n:builderid/builds/n:build_number", "build", "builds"),
    ("builders/n:builderid/builds/n:build_number/steps", "step", "steps"),
    ("builders/n:builderid/builds/n:build_number/steps/i:step_name", "step", "steps"),
    ("builders/n:builderid/builds/n:build_number/steps/n:step_number", "step", "steps"),
    ("builders/n:builderid/buildrequests", "buildrequest", "buildrequests"),
    ("builders/n:builderid/forceschedulers", "forcescheduler", "forceschedulers"),
    ("builders/n:builderid/masters", "master", "masters"),
    ("builders/n:builderid/workers", "worker", "workers"),
    ("buildrequests", "buildrequest", "buildrequests"),
    ("buildrequests/n:buildrequestid", "buildrequest", "buildrequests"),
    ("buildrequests/n:buildrequestid/builds", "build", "builds"),
    ("buildrequests/n:buildrequestid/properties", "property", "properties"),
    ("builds", "build", "builds"),
    ("builds/n:buildid", "build", "builds"),
    ("builds/n:buildid/changes", "change", "changes"),
    ("builds/n:buildid/properties", "property", "properties"),
    ("builds/n:buildid/steps", "step", "steps"),
    ("builds/n:buildid/steps/i:step_name", "step", "steps"),
    ("builds/n:buildid/steps/n:step_number", "step", "steps"),
    ("builds/n:buildid/steps/n:step_number/logs", "log", "logs"),
    ("builds/n:buildid/steps/n:step_number/logs/i:log_slug", "log", "logs"),
    ("builds/n:buildid/steps/n:step_number/logs/i:log_slug/contents", "logchunk", "logchunks"),
    ("builds/n:buildid/steps/n:step_number/logs/i:log_slug/raw", "raw", "raw"),
    ("builds/n:buildid/steps/n:step_number/logs/i:log_slug/raw_inline", "raw", "raw"),
    ("builds/n:buildid/test_result_sets", "test_result_set", "test_result_sets"),
    ("builds/n:buildid/triggered_builds", "build", "builds"),
    ("buildsets", "buildset", "buildsets"),
    ("buildsets/n:bsid", "buildset", "buildsets"),
    ("buildsets/n:bsid/properties", "property", "properties"),
    ("changes", "change", "changes"),
    ("changes/n:changeid", "change", "changes"),
    ("changes/n:changeid/builds", "build", "builds"),
    ("changesources", "changesource", "changesources"),
    ("changesources/n:changesourceid", "changesource", "changesources"),
    ("forceschedulers", "forcescheduler", "forceschedulers"),
    ("forceschedulers/i:schedulername", "forcescheduler", "forceschedulers"),
    ("logs/n:logid", "log", "logs"),
    ("logs/n:logid/contents", "logchunk", "logchunks"),
    ("logs/n:logid/raw", "raw", "raw"),
    ("logs/n:logid/raw_inline", "raw", "raw"),
    ("masters", "master", "masters"),
    ("masters/n:masterid", "master", "masters"),
    ("masters/n:masterid/builders", "builder", "builders"),
    ("masters/n:masterid/schedulers", "scheduler", "schedulers"),
    ("masters/n:masterid/workers", "worker", "workers"),
    ("projects", "project", "projects"),
    ("schedulers", "scheduler", "schedulers"),
    ("schedulers/n:schedulerid", "scheduler", "schedulers"),
    ("sourcestamps", "sourcestamp", "sourcestamps"),
    ("sourcestamps/n:ssid", "sourcestamp", "sourcestamps"),
    ("sourcestamps/n:ssid/changes", "change", "changes"),
    ("steps/n:stepid", "step", "steps"),
    ("steps/n:stepid/logs", "log", "logs"),
    ("steps/n:stepid/logs/i:log_slug", "log", "logs"),
    ("steps/n:stepid/logs/i:log_slug/contents", "logchunk", "logchunks"),
    ("steps/n:stepid/logs/i:log_slug/raw", "raw", "raw"),
    ("steps/n:stepid/logs/i:log_slug/raw_inline", "raw", "raw"),
    ("test_result_sets", "test_result_set", "test_result_sets"),
    ("workers", "worker", "workers"),
    ("workers/i:name", "worker", "workers"),
    ("workers/n:workerid", "worker", "workers"),
    ("workers/n:workerid/builders", "builder", "builders"),
    ("workers/n:workerid/builds", "build", "builds"),
];

/// `application.spec`: every endpoint of [`ENDPOINTS`] with the fields of its type where the
/// store keeps them.
fn application_spec() -> Vec<Value> {
    ENDPOINTS
        .iter()
        .map(|(path, kind, plural)| {
            let fields: Vec<Value> = Resource::from_plural(plural)
                .map(|r| r.field_types())
                .unwrap_or_default()
                .into_iter()
                .map(|(name, kind)| json!({ "name": name, "type": kind, "type_spec": { "name": kind } }))
                .collect();
            json!({ "path": path, "type": kind, "plural": plural, "type_spec": { "name": kind, "fields": fields } })
        })
        .collect()
}
