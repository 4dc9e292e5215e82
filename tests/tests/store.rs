//! The store's conformance suite: every test runs against SQLite and against PostgreSQL.

use std::collections::HashSet;

use kiln_master::domain::{Delivery, NewBuildset, NewChange, SourceStamp, Submitted};
use kiln_master::properties::Properties;
use kiln_master::results::Results;
use kiln_master::store::{ListQuery, LogTail, Op, Resource, Store};
use kiln_tests::pg;
use serde_json::json;

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    (Store::connect(&url).await.unwrap(), dir)
}

async fn postgres() -> (Store, tempfile::TempDir) {
    let url = pg::fresh_database().await;
    (Store::connect(&url).await.unwrap(), tempfile::tempdir().unwrap())
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { let (store, _dir) = super::sqlite().await; super::$name(store).await } )*
        }
        mod on_postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { let (store, _dir) = super::postgres().await; super::$name(store).await } )*
        }
    };
}

conformance!(
    migrations_apply_once,
    changes_are_stored_with_a_deduplicated_sourcestamp,
    claims_take_the_highest_priority_then_the_oldest,
    concurrent_claims_never_share_a_request,
    claims_respect_the_builders_a_worker_serves,
    a_stale_claim_token_changes_nothing,
    a_released_request_returns_to_the_queue,
    expired_leases_are_reaped_and_their_builds_retried,
    a_build_ended_by_another_master_still_owes_its_end_reports,
    a_report_claim_that_lapsed_is_claimed_again_and_a_live_one_is_not,
    shortened_claims_expire_early_and_only_for_their_master,
    a_webhook_delivery_is_stored_once_until_forgotten,
    a_change_scheduled_again_gets_each_schedulers_action_once,
    a_shared_key_is_made_once_and_kept,
    builds_are_numbered_per_builder,
    the_previous_build_is_the_last_finished_one_not_retried,
    a_buildset_completes_with_the_worst_result,
    logs_round_trip_through_compressed_chunks,
    a_build_write_tried_again_after_its_commit_is_recorded_once,
    the_data_api_filters_orders_and_pages_in_sql,
    compatible_older_requests_collapse_as_skipped,
    completed_buildsets_are_taken_from_the_outbox_once,
    old_logs_are_deleted_in_batches_and_running_builds_keep_theirs,
);

const LEASE: i64 = 60_000;

async fn builder(store: &Store, name: &str) -> i64 {
    store.upsert_builder(name, None, &[]).await.unwrap()
}

/// A build of builder `b` running on worker `w` of master `m`.
async fn one_running_build(store: &Store) -> kiln_master::store::NewBuild {
    let master = store.register_master("m").await.unwrap();
    let worker = store.worker_connected("w", &json!({}), Some(master), &[]).await.unwrap();
    let b = builder(store, "b").await;
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    store.new_build(b, claim.brid, worker, master, &Properties::new(), &[]).await.unwrap()
}

fn buildset(builderids: Vec<i64>, priority: i64) -> NewBuildset {
    NewBuildset {
        reason: "test".into(),
        sourcestamps: vec![SourceStamp { branch: Some("main".into()), repository: "r".into(), ..Default::default() }],
        builderids,
        priority,
        ..Default::default()
    }
}

async fn migrations_apply_once(store: Store) {
    // Connecting again to the same database must find the schema current and change nothing.
    let master = store.register_master("m").await.unwrap();
    assert_eq!(store.register_master("m").await.unwrap(), master);
    store.ping().await.unwrap();
}

async fn changes_are_stored_with_a_deduplicated_sourcestamp(store: Store) {
    let change = NewChange {
        author: "Ada <ada@example.org>".into(),
        comments: "fix".into(),
        branch: Some("main".into()),
        revision: Some("abc".into()),
        when_ms: Some(1_700_000_000_000),
        repository: "https://example.org/r.git".into(),
        files: vec!["a.c".into()],
        ..Default::default()
    };
    let first = store.add_change(&change).await.unwrap();
    let second = store.add_change(&change).await.unwrap();
    assert_ne!(first.changeid, second.changeid);
    assert_eq!(first.sourcestampid, second.sourcestampid, "same source state, same source stamp");
    let (changes, total) = store.list(Resource::Changes, &ListQuery::default()).await.unwrap();
    assert_eq!(total, 2);
    assert_eq!(changes[0]["author"], "Ada <ada@example.org>");
    assert_eq!(changes[0]["files"], json!(["a.c"]));
    assert_eq!(changes[0]["when_timestamp"], 1_700_000_000);
    assert_eq!(changes[0]["sourcestamp"]["revision"], "abc");
}

async fn claims_take_the_highest_priority_then_the_oldest(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let b = builder(&store, "b").await;
    let Submitted { requests: low, .. } = store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let Submitted { requests: high, .. } = store.add_buildset(&buildset(vec![b], 5)).await.unwrap();
    let Submitted { requests: low2, .. } = store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let order: Vec<i64> = [
        store.claim_next(master, None, LEASE).await.unwrap().unwrap().brid,
        store.claim_next(master, None, LEASE).await.unwrap().unwrap().brid,
        store.claim_next(master, None, LEASE).await.unwrap().unwrap().brid,
    ]
    .to_vec();
    assert_eq!(order, vec![high[0].brid, low[0].brid, low2[0].brid]);
    assert!(store.claim_next(master, None, LEASE).await.unwrap().is_none());
}

async fn concurrent_claims_never_share_a_request(store: Store) {
    let b = builder(&store, "b").await;
    let masters = [store.register_master("m1").await.unwrap(), store.register_master("m2").await.unwrap()];
    for _ in 0..60 {
        store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for claimer in 0..6 {
        let store = store.clone();
        let master = masters[claimer % 2];
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(claim) = store.claim_next(master, None, LEASE).await.unwrap() {
                mine.push(claim.brid);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 60, "every request claimed");
    assert_eq!(unique.len(), 60, "no request claimed twice");
}

async fn claims_respect_the_builders_a_worker_serves(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let a = builder(&store, "a").await;
    let b = builder(&store, "b").await;
    let Submitted { requests, .. } = store.add_buildset(&buildset(vec![a], 0)).await.unwrap();
    assert!(store.claim_next(master, Some(&[b]), LEASE).await.unwrap().is_none());
    assert!(store.claim_next(master, Some(&[]), LEASE).await.unwrap().is_none());
    let claim = store.claim_next(master, Some(&[b, a]), LEASE).await.unwrap().unwrap();
    assert_eq!(claim.brid, requests[0].brid);

    // Among several builders: the highest priority of all first, then the oldest of all.
    let c = builder(&store, "c").await;
    let mut submitted = Vec::new();
    for (builderid, priority) in [(a, 0), (b, 0), (c, 5), (b, 5), (a, 0)] {
        submitted.push(store.add_buildset(&buildset(vec![builderid], priority)).await.unwrap().requests[0].brid);
    }
    let mut claimed = Vec::new();
    while let Some(claim) = store.claim_next(master, Some(&[a, b, c]), LEASE).await.unwrap() {
        claimed.push(claim.brid);
        assert!(claimed.len() <= submitted.len());
    }
    let expected = [submitted[2], submitted[3], submitted[0], submitted[1], submitted[4]];
    assert_eq!(claimed, expected, "priority first, then submission, across the builders");
}

async fn a_stale_claim_token_changes_nothing(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let b = builder(&store, "b").await;
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    assert!(!store.complete_request(claim.brid, claim.claim_token ^ 1, Results::Success).await.unwrap());
    assert!(!store.release_request(claim.brid, claim.claim_token ^ 1).await.unwrap());
    assert!(store.claim_held(claim.brid, claim.claim_token).await.unwrap());
    assert!(store.complete_request(claim.brid, claim.claim_token, Results::Success).await.unwrap());
    assert!(
        !store.complete_request(claim.brid, claim.claim_token, Results::Failure).await.unwrap(),
        "complete only once"
    );
}

async fn a_released_request_returns_to_the_queue(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let worker = store.worker_connected("w", &json!({}), Some(master), &[]).await.unwrap();
    let b = builder(&store, "b").await;
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    let cut_short = store.new_build(b, claim.brid, worker, master, &Properties::new(), &[]).await.unwrap();
    assert_eq!(store.pending_count().await.unwrap(), 0);
    assert!(store.release_request(claim.brid, claim.claim_token).await.unwrap());
    let (builds, _) = store.list(Resource::Builds, &ListQuery::by("buildid", cut_short.buildid)).await.unwrap();
    assert_eq!(builds[0]["results"], Results::Retry.code(), "an open build of a released request ends as RETRY");
    assert_eq!(store.pending_count().await.unwrap(), 1);
    let again = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    assert_eq!(again.brid, claim.brid);
    assert_ne!(again.claim_token, claim.claim_token, "a new claim gets a new token");
}

async fn expired_leases_are_reaped_and_their_builds_retried(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let worker = store.worker_connected("w", &json!({}), Some(master), &[]).await.unwrap();
    let b = builder(&store, "b").await;
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let claim = store.claim_next(master, None, -1).await.unwrap().unwrap();
    let build = store.new_build(b, claim.brid, worker, master, &Properties::new(), &[]).await.unwrap();
    store.begin_step(build.buildid, 0, "s", "running").await.unwrap();
    let reaped = store.reap_expired_claims().await.unwrap();
    assert_eq!(reaped.requeued, vec![claim.brid]);
    assert_eq!(reaped.retried_builds, vec![build.buildid]);
    let (builds, _) = store.list(Resource::Builds, &ListQuery::by("buildid", build.buildid)).await.unwrap();
    assert_eq!(builds[0]["results"], Results::Retry.code());
    assert_eq!(builds[0]["complete"], true);
    assert!(
        !store.complete_request(claim.brid, claim.claim_token, Results::Success).await.unwrap(),
        "the old claim is void"
    );
    assert_eq!(store.pending_count().await.unwrap(), 1);
}

/// A build's end reports are held from its start and made due by whatever ends it: here the
/// housekeeping that takes back a dead master's claim, CANCELLED for a stop asked meanwhile.
/// A build reaped RETRY drops them: its request runs again, and that build reports.
async fn a_build_ended_by_another_master_still_owes_its_end_reports(store: Store) {
    use kiln_master::store::{NewReport, ReportEvent};
    let (dead, alive) = (store.register_master("dead").await.unwrap(), store.register_master("alive").await.unwrap());
    let worker = store.worker_connected("w", &json!({}), Some(dead), &[]).await.unwrap();
    let b = builder(&store, "b").await;
    let report = |revision: &str, event| NewReport {
        reporter: "github".into(),
        order_key: format!("github\nb\n{revision}"),
        event,
    };
    let mut builds = Vec::new();
    for revision in ["abc", "def"] {
        let owed = [report(revision, ReportEvent::Started), report(revision, ReportEvent::Finished)];
        store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
        let claim = store.claim_next(dead, None, -1).await.unwrap().unwrap();
        builds
            .push((claim.brid, store.new_build(b, claim.brid, worker, dead, &Properties::new(), &owed).await.unwrap()));
    }
    let events = |claimed: &[kiln_master::store::ClaimedReport]| {
        claimed.iter().map(|r| (r.buildid, r.event.clone())).collect::<Vec<_>>()
    };
    let (stopped, retried) = (builds[0].1.buildid, builds[1].1.buildid);
    let due = store.claim_reports(alive, 60_000, 10).await.unwrap();
    assert_eq!(events(&due), [(stopped, "started".to_owned()), (retried, "started".to_owned())], "ends are held");
    for report in &due {
        store.settle_report(report.id, alive, kiln_master::store::Settled::Sent, "ok").await.unwrap();
    }
    assert!(store.request_stop(builds[0].0).await.unwrap());
    let reaped = store.reap_expired_claims().await.unwrap();
    assert_eq!((reaped.cancelled, reaped.requeued), (vec![builds[0].0], vec![builds[1].0]));
    let due = store.claim_reports(alive, 60_000, 10).await.unwrap();
    assert_eq!(
        events(&due),
        [(stopped, "finished".to_owned())],
        "the cancelled build's end is due; the retried one's dropped"
    );
}

/// A report being sent is nobody else's to claim, and holds back the later reports of its commit
/// and context; once its claim lapses (its master died mid-send) it is freed and claimed again.
/// Reports sent are settled, and their builds read, in one statement for any number.
async fn a_report_claim_that_lapsed_is_claimed_again_and_a_live_one_is_not(store: Store) {
    use kiln_master::store::{NewReport, ReportEvent};
    let (dead, alive) = (store.register_master("dead").await.unwrap(), store.register_master("alive").await.unwrap());
    let worker = store.worker_connected("w", &json!({}), Some(dead), &[]).await.unwrap();
    let b = builder(&store, "b").await;
    let mut buildids = Vec::new();
    for _ in 0..3 {
        // Three builds of one commit and context: their reports go out in order.
        let owed =
            [NewReport { reporter: "github".into(), order_key: "github\nb\nabc".into(), event: ReportEvent::Started }];
        store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
        let claim = store.claim_next(dead, None, LEASE).await.unwrap().unwrap();
        buildids.push(store.new_build(b, claim.brid, worker, dead, &Properties::new(), &owed).await.unwrap().buildid);
    }
    let ids = |claimed: &[kiln_master::store::ClaimedReport]| claimed.iter().map(|r| r.buildid).collect::<Vec<_>>();

    // The dead master claims the first with a claim that has already lapsed, the way a claim of
    // a master killed mid-send does a minute later.
    let first = store.claim_reports(dead, -1, 10).await.unwrap();
    assert_eq!(ids(&first), [buildids[0]], "one at a time per commit and context");
    assert_eq!(ids(&store.claim_reports(alive, LEASE, 10).await.unwrap()), Vec::<i64>::new(), "held back");
    assert_eq!(store.release_expired_report_claims().await.unwrap(), 1);
    let again = store.claim_reports(alive, LEASE, 10).await.unwrap();
    assert_eq!(ids(&again), [buildids[0]], "the lapsed claim's report is claimed again");
    assert_eq!(store.release_expired_report_claims().await.unwrap(), 0, "a live claim is not freed");
    assert_eq!(ids(&store.claim_reports(dead, LEASE, 10).await.unwrap()), Vec::<i64>::new(), "nor claimed twice");
    assert_eq!(store.settle_reports_sent(&[again[0].id], dead).await.unwrap(), 0, "only by the claim's holder");
    assert_eq!(store.settle_reports_sent(&[again[0].id], alive).await.unwrap(), 1);

    let next = store.claim_reports(alive, LEASE, 10).await.unwrap();
    assert_eq!(ids(&next), [buildids[1]]);
    assert_eq!(store.settle_reports_sent(&[next[0].id], alive).await.unwrap(), 1);
    let last = store.claim_reports(alive, LEASE, 10).await.unwrap();
    assert_eq!(ids(&last), [buildids[2]]);
    assert_eq!(store.settle_reports_sent(&[last[0].id], alive).await.unwrap(), 1);
    assert_eq!(store.settle_reports_sent(&[], alive).await.unwrap(), 0);

    let read = store.reported_builds(&[buildids[0], buildids[2], 999_999]).await.unwrap();
    assert_eq!(read.len(), 2, "a build not found is left out");
    for id in [buildids[0], buildids[2]] {
        let build = &read[&id];
        assert_eq!((build.builder.as_str(), build.sourcestamps.len()), ("b", 1));
        assert_eq!(build.sourcestamps[0].branch.as_deref(), Some("main"));
    }
    let states: Vec<String> =
        store.list_reports(None, 10).await.unwrap().iter().map(|r| r["state"].as_str().unwrap().to_owned()).collect();
    assert_eq!(states, ["sent", "sent", "sent"]);

    // Settled reports are forgotten once old enough, the oldest first; those still owed stay.
    let owed =
        [NewReport { reporter: "github".into(), order_key: "github\nb\nxyz".into(), event: ReportEvent::Started }];
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let claim = store.claim_next(alive, None, LEASE).await.unwrap().unwrap();
    store.new_build(b, claim.brid, worker, alive, &Properties::new(), &owed).await.unwrap();
    assert_eq!(store.forget_reports_settled_before(0, 10).await.unwrap(), 0, "none settled that long ago");
    let later = store.now_ms() + 1;
    assert_eq!(store.forget_reports_settled_before(later, 2).await.unwrap(), 2, "a batch at a time");
    assert_eq!(store.forget_reports_settled_before(later, 2).await.unwrap(), 1);
    assert_eq!(store.forget_reports_settled_before(later, 2).await.unwrap(), 0);
    let left = store.list_reports(None, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["state"], "pending", "a report still owed is kept");
}

async fn a_shared_key_is_made_once_and_kept(store: Store) {
    let (first, again) = (store.shared_key("ui-session").await.unwrap(), store.shared_key("ui-session").await.unwrap());
    assert_eq!(first.len(), 32);
    assert_eq!(first, again, "every master reads the key the first one made");
    assert_ne!(store.shared_key("another").await.unwrap(), first);
}

async fn a_webhook_delivery_is_stored_once_until_forgotten(store: Store) {
    let change = NewChange { author: "a".into(), branch: Some("main".into()), ..Default::default() };
    let delivery = Delivery { source: "github".into(), id: "72d3162e".into() };
    let changes = [change.clone(), change];
    assert_eq!(store.add_delivered_changes(&delivery, &changes).await.unwrap().map(|c| c.len()), Some(2));
    assert_eq!(store.add_delivered_changes(&delivery, &changes).await.unwrap(), None, "seen before");
    let elsewhere = Delivery { source: "gitlab".into(), id: delivery.id.clone() };
    assert!(store.add_delivered_changes(&elsewhere, &changes[..1]).await.unwrap().is_some(), "ids are per source");
    assert_eq!(store.list(Resource::Changes, &ListQuery::default()).await.unwrap().1, 3);
    assert_eq!(store.forget_deliveries_before(store.now_ms() - 60_000).await.unwrap(), 0, "all are recent");
    assert_eq!(store.forget_deliveries_before(store.now_ms() + 1).await.unwrap(), 2);
    assert!(store.add_delivered_changes(&delivery, &changes[..1]).await.unwrap().is_some());
}

async fn a_change_scheduled_again_gets_each_schedulers_action_once(store: Store) {
    let b = builder(&store, "b").await;
    let change = NewChange { author: "a".into(), branch: Some("main".into()), ..Default::default() };
    let stored = store.add_change(&change).await.unwrap();
    let later = store.now_ms() + 1;
    let left: Vec<i64> = store.unscheduled_changes(later, 10).await.unwrap().iter().map(|c| c.changeid).collect();
    assert_eq!(left, [stored.changeid], "a change is unscheduled until every scheduler has acted");
    assert!(store.unscheduled_changes(store.now_ms() - 60_000, 10).await.unwrap().is_empty(), "only old ones");

    let first = store.add_buildset_for_change(&buildset(vec![b], 0), stored.changeid, "main").await.unwrap();
    assert!(first.is_some());
    let again = store.add_buildset_for_change(&buildset(vec![b], 0), stored.changeid, "main").await.unwrap();
    assert_eq!(again, None, "a scheduler acts once on a change");
    assert!(store.add_buildset_for_change(&buildset(vec![b], 0), stored.changeid, "other").await.unwrap().is_some());
    assert_eq!(store.list(Resource::Buildsets, &ListQuery::default()).await.unwrap().1, 2);
    store.remember_change("nightly", stored.changeid, true).await.unwrap();
    store.remember_change("nightly", stored.changeid, true).await.unwrap();
    let fire = |_| Some(later + 60_000);
    store.classify_change("stable", "main", stored.changeid, true, fire).await.unwrap();
    store
        .classify_change("stable", "main", stored.changeid, true, |_| panic!("the timer is not moved again"))
        .await
        .unwrap();

    store.change_scheduled(stored.changeid).await.unwrap();
    assert!(store.unscheduled_changes(later, 10).await.unwrap().is_empty());
    assert_eq!(store.forget_change_schedulings_before(store.now_ms() - 60_000).await.unwrap(), 0, "all are recent");
    assert_eq!(store.forget_change_schedulings_before(store.now_ms() + 1).await.unwrap(), 4);
}

async fn shortened_claims_expire_early_and_only_for_their_master(store: Store) {
    let (restarted, other) = (store.register_master("m").await.unwrap(), store.register_master("n").await.unwrap());
    let b = builder(&store, "b").await;
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let orphan = store.claim_next(restarted, None, LEASE).await.unwrap().unwrap();
    let live = store.claim_next(other, None, LEASE).await.unwrap().unwrap();
    assert_eq!(store.shorten_claims(restarted, store.now_ms() + LEASE * 2).await.unwrap(), 0, "never lengthened");
    assert_eq!(store.reap_expired_claims().await.unwrap().requeued, Vec::<i64>::new());
    assert_eq!(store.shorten_claims(restarted, store.now_ms() - 1).await.unwrap(), 1);
    let reaped = store.reap_expired_claims().await.unwrap();
    assert_eq!(reaped.requeued, vec![orphan.brid], "only the restarted master's claim is taken back");
    assert!(store.claim_held(live.brid, live.claim_token).await.unwrap());
}

/// A session lock on the database at `url` has one holder among stores (processes) at a time,
/// and is free again once its holder lets it go.
async fn a_session_lock_has_one_holder_at_a_time(url: &str) {
    let (first, second) = (Store::connect(url).await.unwrap(), Store::connect(url).await.unwrap());
    let held = first.try_session_lock("kiln-master:1").await.unwrap().expect("free at first");
    assert!(second.try_session_lock("kiln-master:1").await.unwrap().is_none(), "held by the first store");
    assert!(second.try_session_lock("kiln-master:2").await.unwrap().is_some(), "another name is free");
    held.release().await;
    assert!(second.try_session_lock("kiln-master:1").await.unwrap().is_some(), "free once released");
}

#[tokio::test]
async fn a_session_lock_has_one_holder_at_a_time_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    a_session_lock_has_one_holder_at_a_time(&format!("sqlite://{}", dir.path().join("kiln.sqlite").display())).await;
}

#[tokio::test]
async fn a_session_lock_has_one_holder_at_a_time_on_postgres() {
    a_session_lock_has_one_holder_at_a_time(&pg::fresh_database().await).await;
}

async fn builds_are_numbered_per_builder(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let worker = store.worker_connected("w", &json!({}), Some(master), &[]).await.unwrap();
    let a = builder(&store, "a").await;
    let b = builder(&store, "b").await;
    store.add_buildset(&buildset(vec![a, b], 0)).await.unwrap();
    store.add_buildset(&buildset(vec![a], 0)).await.unwrap();
    let mut numbers = Vec::new();
    while let Some(claim) = store.claim_next(master, None, LEASE).await.unwrap() {
        let build =
            store.new_build(claim.builderid, claim.brid, worker, master, &Properties::new(), &[]).await.unwrap();
        numbers.push((claim.builderid, build.number));
    }
    numbers.sort();
    assert_eq!(numbers, vec![(a, 1), (a, 2), (b, 1)]);
}

async fn the_previous_build_is_the_last_finished_one_not_retried(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let worker = store.worker_connected("w", &json!({}), Some(master), &[]).await.unwrap();
    let b = builder(&store, "b").await;
    let mut numbers = Vec::new();
    for results in [Results::Failure, Results::Success, Results::Retry, Results::Failure] {
        store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
        let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
        let build = store.new_build(b, claim.brid, worker, master, &Properties::new(), &[]).await.unwrap();
        assert!(store.finish_build(build.buildid, results, "done", &Properties::new(), &claim).await.unwrap());
        if results == Results::Retry {
            // The retried request runs again as the next build; finish it too.
            let again = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
            let rerun = store.new_build(b, again.brid, worker, master, &Properties::new(), &[]).await.unwrap();
            store.finish_build(rerun.buildid, Results::Warnings, "done", &Properties::new(), &again).await.unwrap();
            numbers.push(rerun.number);
        }
        numbers.push(build.number);
    }
    numbers.sort();
    assert_eq!(numbers, [1, 2, 3, 4, 5]);
    let previous = |number| store.previous_build_results(b, number);
    assert_eq!(previous(1).await.unwrap(), None, "the first build has none");
    assert_eq!(previous(2).await.unwrap(), Some(Results::Failure));
    assert_eq!(previous(4).await.unwrap(), Some(Results::Success), "build 3 ended RETRY and is passed over");
    assert_eq!(previous(5).await.unwrap(), Some(Results::Warnings));
}

async fn a_buildset_completes_with_the_worst_result(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let a = builder(&store, "a").await;
    let b = builder(&store, "b").await;
    let Submitted { bsid, .. } = store.add_buildset(&buildset(vec![a, b], 0)).await.unwrap();
    let first = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    store.complete_request(first.brid, first.claim_token, Results::Success).await.unwrap();
    let (sets, _) = store.list(Resource::Buildsets, &ListQuery::by("bsid", bsid)).await.unwrap();
    assert_eq!(sets[0]["complete"], false);
    assert_eq!(sets[0]["results"], -1);
    let second = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    store.complete_request(second.brid, second.claim_token, Results::Failure).await.unwrap();
    let (sets, _) = store.list(Resource::Buildsets, &ListQuery::by("bsid", bsid)).await.unwrap();
    assert_eq!(sets[0]["complete"], true);
    assert_eq!(sets[0]["results"], Results::Failure.code());
    assert_eq!(sets[0]["sourcestamps"][0]["branch"], "main");
}

async fn logs_round_trip_through_compressed_chunks(store: Store) {
    let build = one_running_build(&store).await;
    let (step, log) = store.begin_step(build.buildid, 0, "s", "running").await.unwrap();
    let big: String = (0..2000).map(|i| format!("oline {i} of a long build log\n")).collect();
    let next = store.append_log(log, 0, &big).await.unwrap();
    assert_eq!(next, 2000);
    let tail = LogTail { logid: log, first_line: next, text: "hprogram finished with exit code 0\n".into() };
    store.finish_step(step, Results::Success, "done", &tail).await.unwrap();
    let all = store.log_lines(log, 0, None).await.unwrap();
    assert_eq!(all, format!("{big}hprogram finished with exit code 0\n"));
    assert_eq!(
        store.log_lines(log, 1999, Some(2)).await.unwrap(),
        "oline 1999 of a long build log\nhprogram finished with exit code 0\n"
    );
    let (logs, _) = store.list(Resource::Logs, &ListQuery::by("logid", log)).await.unwrap();
    assert_eq!(logs[0]["num_lines"], 2001);
    assert_eq!(logs[0]["complete"], true);
    let (steps, _) = store.list(Resource::Steps, &ListQuery::by("stepid", step)).await.unwrap();
    assert_eq!((steps[0]["results"].as_i64(), steps[0]["complete"].as_bool()), (Some(0), Some(true)));
}

/// A build's write whose commit reached the database although its caller saw an error is tried
/// again: a step is recorded once, and a log's lines written again with more that came meanwhile
/// are stored once, the rest following.
async fn a_build_write_tried_again_after_its_commit_is_recorded_once(store: Store) {
    let build = one_running_build(&store).await;
    let skipped = store.skip_step(build.buildid, 0, "first").await.unwrap();
    assert_eq!(store.skip_step(build.buildid, 0, "first").await.unwrap(), skipped, "a step is recorded once");
    let (step, log) = store.begin_step(build.buildid, 1, "s", "running").await.unwrap();
    assert_eq!(store.begin_step(build.buildid, 1, "s", "running").await.unwrap(), (step, log));
    let (steps, _) = store.list(Resource::Steps, &ListQuery::by("buildid", build.buildid)).await.unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(store.append_log(log, 0, "oone\notwo\n").await.unwrap(), 2);
    // The writer saw the first write fail, so it writes its lines again with what came since.
    assert_eq!(store.append_log(log, 0, "oone\notwo\nothree\n").await.unwrap(), 3);
    assert_eq!(store.append_log(log, 0, "oone\notwo\nothree\n").await.unwrap(), 3, "and once more");
    assert_eq!(store.append_log(log, 3, "ofour\n").await.unwrap(), 4);
    let tail = LogTail { logid: log, first_line: 4, text: "hdone\n".into() };
    store.finish_step(step, Results::Success, "done", &tail).await.unwrap();
    // The step's end, tried again after a commit its caller did not hear of.
    store.finish_step(step, Results::Success, "done", &tail).await.unwrap();
    assert_eq!(store.log_lines(log, 0, None).await.unwrap(), "oone\notwo\nothree\nofour\nhdone\n");
    assert_eq!(store.log_lines(log, 2, Some(2)).await.unwrap(), "othree\nofour\n");
    let (logs, _) = store.list(Resource::Logs, &ListQuery::by("logid", log)).await.unwrap();
    assert_eq!(logs[0]["num_lines"], 5);
}

async fn the_data_api_filters_orders_and_pages_in_sql(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let a = builder(&store, "a").await;
    for priority in 0..5 {
        store.add_buildset(&buildset(vec![a], priority)).await.unwrap();
    }
    let query = ListQuery { order: vec!["-priority".into()], limit: Some(2), offset: 1, ..Default::default() };
    let (page, total) = store.list(Resource::BuildRequests, &query).await.unwrap();
    assert_eq!(total, 5, "meta.total counts every match, not the page");
    let priorities: Vec<i64> = page.iter().map(|r| r["priority"].as_i64().unwrap()).collect();
    assert_eq!(priorities, vec![3, 2]);
    let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    let claimed = ListQuery::by("claimed", "true");
    let (rows, total) = store.list(Resource::BuildRequests, &claimed).await.unwrap();
    assert_eq!((rows.len(), total), (1, 1));
    assert_eq!(rows[0]["buildrequestid"], claim.brid);
    let mut ge = ListQuery::default();
    ge.filters.push(kiln_master::store::Filter { field: "priority".into(), op: Op::Ge, values: vec!["3".into()] });
    assert_eq!(store.list(Resource::BuildRequests, &ge).await.unwrap().1, 2);
    let unknown = ListQuery::by("colour", "red");
    assert!(store.list(Resource::BuildRequests, &unknown).await.is_err());
    let bad = ListQuery::by("priority", "high");
    assert!(store.list(Resource::BuildRequests, &bad).await.is_err());
}

async fn compatible_older_requests_collapse_as_skipped(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let b = builder(&store, "b").await;
    let change = NewChange {
        branch: Some("main".into()),
        revision: Some("r1".into()),
        repository: "r".into(),
        ..Default::default()
    };
    store.add_change(&change).await.unwrap();
    let with_change = |revision: &str| NewBuildset {
        sourcestamps: vec![SourceStamp {
            branch: Some("main".into()),
            revision: Some(revision.into()),
            repository: "r".into(),
            ..Default::default()
        }],
        builderids: vec![b],
        collapse_builderids: vec![b],
        ..Default::default()
    };
    let Submitted { bsid: old_bsid, requests: old } = store.add_buildset(&with_change("r1")).await.unwrap();
    let claimed_meanwhile = store.add_buildset(&buildset(vec![b], 0)).await.unwrap().requests[0].brid;
    let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    assert_eq!(claim.brid, old[0].brid, "the oldest request is claimed first");
    store.release_request(claim.brid, claim.claim_token).await.unwrap();
    let change2 = NewChange { revision: Some("r2".into()), ..change };
    store.add_change(&change2).await.unwrap();
    let Submitted { requests: new, .. } = store.add_buildset(&with_change("r2")).await.unwrap();
    let (rows, _) = store.list(Resource::BuildRequests, &ListQuery::by("buildrequestid", old[0].brid)).await.unwrap();
    assert_eq!((rows[0]["complete"].as_bool(), rows[0]["results"].as_i64()), (Some(true), Some(3)), "SKIPPED");
    let (sets, _) = store.list(Resource::Buildsets, &ListQuery::by("bsid", old_bsid)).await.unwrap();
    assert_eq!(sets[0]["results"], 0, "a buildset of collapsed requests reports SUCCESS");
    let (rows, _) =
        store.list(Resource::BuildRequests, &ListQuery::by("buildrequestid", claimed_meanwhile)).await.unwrap();
    assert_eq!(rows[0]["complete"], false, "a forced build without changes is not collapsed by a change");
    let (rows, _) = store.list(Resource::BuildRequests, &ListQuery::by("buildrequestid", new[0].brid)).await.unwrap();
    assert_eq!(rows[0]["complete"], false);
}

async fn completed_buildsets_are_taken_from_the_outbox_once(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let b = builder(&store, "b").await;
    let Submitted { bsid, .. } = store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
    let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
    store.complete_request(claim.brid, claim.claim_token, Results::Warnings).await.unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let follow_up = |c: &kiln_master::domain::CompletedBuildset| {
        seen.lock().unwrap().push((c.bsid, c.results, c.details.sourcestamps[0].branch.clone()));
        vec![buildset(vec![b], 0)]
    };
    let (taken, submitted) = store.take_completed_buildsets(10, follow_up).await.unwrap();
    assert_eq!((taken, submitted.len()), (1, 1));
    assert_eq!(seen.lock().unwrap().clone(), vec![(bsid, Results::Warnings, Some("main".to_owned()))]);
    let (taken, _) = store.take_completed_buildsets(10, |_| Vec::new()).await.unwrap();
    assert_eq!(taken, 0, "each completion is taken once");
    assert_eq!(store.pending_count().await.unwrap(), 1, "the follow-up buildset was submitted");
}

async fn old_logs_are_deleted_in_batches_and_running_builds_keep_theirs(store: Store) {
    let master = store.register_master("m").await.unwrap();
    let worker = store.worker_connected("w", &json!({}), Some(master), &[]).await.unwrap();
    let b = builder(&store, "b").await;
    let mut logs = Vec::new();
    for i in 0..3 {
        store.add_buildset(&buildset(vec![b], 0)).await.unwrap();
        let claim = store.claim_next(master, None, LEASE).await.unwrap().unwrap();
        let build = store.new_build(b, claim.brid, worker, master, &Properties::new(), &[]).await.unwrap();
        let (step, log) = store.begin_step(build.buildid, 0, "s", "running").await.unwrap();
        let next = store.append_log(log, 0, &"obuilding\n".repeat(100)).await.unwrap();
        let tail = LogTail { logid: log, first_line: next, text: "hdone\n".into() };
        store.finish_step(step, Results::Success, "done", &tail).await.unwrap();
        if i < 2 {
            store.finish_build(build.buildid, Results::Success, "finished", &Properties::new(), &claim).await.unwrap();
        }
        logs.push(log);
    }
    assert_eq!(store.delete_old_logs(0, 10).await.unwrap(), 0, "no build finished before the horizon");
    let later = store.now_ms() + 60_000;
    assert_eq!(store.delete_old_logs(later, 1).await.unwrap(), 1, "one log per batch");
    assert_eq!(store.delete_old_logs(later, 1).await.unwrap(), 1);
    assert_eq!(store.delete_old_logs(later, 1).await.unwrap(), 0, "the running build keeps its log");
    for (i, log) in logs.iter().enumerate() {
        let (rows, _) = store.list(Resource::Logs, &ListQuery::by("logid", log)).await.unwrap();
        let text = store.log_lines(*log, 0, None).await.unwrap();
        if i < 2 {
            assert_eq!((rows[0]["type"].as_str(), text.as_str()), (Some("d"), ""), "log {log} deleted");
            assert_eq!(rows[0]["num_lines"], 101, "the log's row stays");
        } else {
            assert_eq!((rows[0]["type"].as_str(), text.lines().count()), (Some("s"), 101), "log {log} kept");
        }
    }
}
