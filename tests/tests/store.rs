//! The store against a real etcd: the list-then-watch primitive's pages and changes, and the
//! replay queue's layout — group commit, fenced finishes, paged listing, retention.

use berth_proto::v1::{Request, RequestState, StoredResponse};
use berth_store::watch::{list_watch, Change, LIST_KEYS_PAGE, LIST_PAGE};
use berth_store::{
    Claim, ClaimOutcome, EtcdTls, Finished, Placement, Retention, Store, StoreError, StoredRequest,
};
use berth_tests::Etcd;
use std::time::{Duration, SystemTime};

async fn store(etcd: &Etcd) -> Store {
    Store::connect(&[etcd.url()], "/t", &EtcdTls::default())
        .await
        .unwrap()
}

fn request(agent: &str, id: &str) -> Request {
    Request {
        id: id.into(),
        agent: agent.into(),
        state: RequestState::Queued as i32,
        method: "POST".into(),
        path: "/echo".into(),
        body: id.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Queues request `id` for agent `a` and reads its record back, as a replayer sees it.
async fn queued(store: &Store, id: &str) -> (u64, StoredRequest) {
    let mut r = request("a", id);
    store
        .enqueue_request(&mut r, Duration::from_secs(600))
        .await
        .unwrap();
    let record = store.get_request_record("a", r.seq).await.unwrap().unwrap();
    (r.seq, record)
}

/// Claims `record` for gateway `gateway` under `lease`, for 30 s; panics if it is not claimed.
async fn claim(store: &Store, record: &StoredRequest, gateway: &str, lease: i64) -> Claim {
    let deadline = SystemTime::now() + Duration::from_secs(30);
    match store
        .claim_request(record, gateway, lease, deadline)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(claim) => *claim,
        other => panic!("{} not claimed: {other:?}", record.request.id),
    }
}

async fn next(watch: &mut berth_store::watch::ListWatch) -> Change {
    tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("a change within 10 s")
}

#[tokio::test]
async fn a_list_watch_lists_in_pages_then_follows() {
    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();
    // Over one page of keys, whose values come in pages of LIST_PAGE.
    let count = LIST_KEYS_PAGE as usize + LIST_PAGE as usize * 2 + 88;
    let keys: Vec<String> = (0..count).map(|i| format!("/x/{i:05}")).collect();
    for chunk in keys.chunks(100) {
        let puts: Vec<_> = chunk
            .iter()
            .map(|k| etcd_client::TxnOp::put(k.as_str(), format!("v{k}"), None))
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .unwrap();
    }
    let store = store(&etcd).await;
    let mut watch = list_watch(&store, "/x/".into());
    assert!(matches!(next(&mut watch).await, Change::Init));
    let mut listed = Vec::new();
    let revision = loop {
        match next(&mut watch).await {
            Change::InitApply(kv) => {
                let key = kv.key_str().unwrap().to_string();
                assert_eq!(kv.value_str().unwrap(), format!("v{key}"), "its own value");
                listed.push(key);
            }
            Change::InitDone { revision } => break revision,
            other => panic!("{other:?} during the list"),
        }
    };
    assert_eq!(listed, keys, "every key once, in order, over the pages");
    client.put("/x/new", "v", None).await.unwrap();
    client.delete("/x/00000", None).await.unwrap();
    client.put("/y/elsewhere", "v", None).await.unwrap();
    match next(&mut watch).await {
        Change::Put(kv) => {
            assert_eq!(kv.key_str().unwrap(), "/x/new");
            assert!(kv.mod_revision() > revision);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(next(&mut watch).await, Change::Delete(kv) if kv.key_str().unwrap() == "/x/00000")
    );
}

#[tokio::test]
async fn a_list_watch_that_fell_far_behind_lists_again_and_misses_nothing() {
    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();
    let store = store(&etcd).await;
    let mut watch = list_watch(&store, "/x/".into());
    assert!(matches!(next(&mut watch).await, Change::Init));
    assert!(matches!(next(&mut watch).await, Change::InitDone { .. }));
    // Nobody reads the watch while 1,200 revisions of 8 KiB (9.4 MiB) are written: etcd holds
    // them for the watcher and then sends up to 1,000 revisions in one message, over the
    // client's 4 MiB limit. Resuming from the same revision would get it again, forever.
    let count = 1200;
    let value = "v".repeat(8 * 1024);
    for i in 0..count {
        client
            .put(format!("/x/{i:05}"), value.as_str(), None)
            .await
            .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut lists = 0;
    while seen.len() < count {
        match next(&mut watch).await {
            Change::Init => {
                lists += 1;
                seen.clear();
            }
            Change::InitApply(kv) | Change::Put(kv) => {
                assert_eq!(kv.value().len(), value.len());
                seen.insert(kv.key().to_vec());
            }
            Change::InitDone { .. } => {}
            Change::Delete(kv) => panic!("nothing was deleted: {kv:?}"),
        }
    }
    println!("list-watch far behind: {count} keys seen, listed again {lists} times");
}

#[tokio::test]
async fn enqueues_arriving_together_share_transactions() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let before = store.etcd_status().await.unwrap().revision;
    let tasks: Vec<_> = (0..96)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut r = request("a", &format!("id-{i}"));
                store
                    .enqueue_request(&mut r, Duration::from_secs(600))
                    .await
                    .unwrap();
                r
            })
        })
        .collect();
    let mut seqs = std::collections::HashSet::new();
    for task in tasks {
        let r = task.await.unwrap();
        assert!(seqs.insert(r.seq), "a position taken twice");
        let stored = store.get_request(&r.id).await.unwrap();
        assert_eq!(stored.request.body, r.id.as_bytes(), "the body, kept apart");
    }
    let revisions = store.etcd_status().await.unwrap().revision - before;
    eprintln!("96 enqueues together: {revisions} etcd revisions");
    // One revision per transaction (and a lease grant or two): fewer than one per request.
    assert!(revisions < 96, "{revisions} revisions for 96 requests");
}

#[tokio::test]
async fn writes_batched_together_each_succeed_or_fail_alone() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    // Each key taken by two requests at once: in one batch the same key twice makes etcd
    // refuse the batch, and each goes alone; exactly one of each pair holds its key.
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let digest = berth_store::requests::key_digest(&format!("key-{}", i % 20));
                let held = store
                    .take_idempotency_key(
                        "a",
                        &digest,
                        &format!("id-{i}"),
                        "p",
                        Duration::from_secs(600),
                    )
                    .await
                    .unwrap();
                (i % 20, held)
            })
        })
        .collect();
    let mut free = [0; 20];
    for task in tasks {
        let (key, held) = task.await.unwrap();
        if held.is_none() {
            free[key] += 1;
        }
    }
    assert_eq!(free, [1; 20], "each key taken exactly once");
}

#[tokio::test]
async fn a_keyed_request_is_queued_with_its_key_in_one_commit_or_not_at_all() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(600);
    let digest = berth_store::requests::key_digest("k");
    let before = store.etcd_status().await.unwrap().revision;
    let mut first = request("a", "first");
    let held = store
        .enqueue_keyed_request(&mut first, ttl, &digest, "p")
        .await
        .unwrap();
    assert!(held.is_none(), "a free key is taken");
    // One transaction: the key and the record at one revision (the lease grant is another).
    let after = store.etcd_status().await.unwrap().revision;
    assert!(after - before <= 2, "{} revisions", after - before);
    assert_eq!(
        store.get_request("first").await.unwrap().request.body,
        b"first"
    );
    assert_eq!(
        store
            .take_idempotency_key("a", &digest, "other", "p", ttl)
            .await
            .unwrap()
            .expect("held")
            .holder,
        "first"
    );
    // Held: nothing is stored, and the holder is told.
    let mut second = request("a", "second");
    let held = store
        .enqueue_keyed_request(&mut second, ttl, &digest, "p2")
        .await
        .unwrap()
        .expect("held by the first");
    assert_eq!(
        (held.holder.as_str(), held.payload.as_str()),
        ("first", "p")
    );
    assert!(store.get_request("second").await.is_err(), "nothing stored");
    let (queued, _) = store.list_requests(Some("a"), 0, 10, "").await.unwrap();
    assert_eq!(queued.len(), 1);
}

#[test]
fn the_store_outlives_the_runtime_that_first_wrote_through_it() {
    // A gateway's serving threads (each its own runtime) write first and stop before the
    // replayer, on the main runtime, writes its last outcomes.
    let main = tokio::runtime::Runtime::new().unwrap();
    let etcd = main.block_on(Etcd::start()).unwrap();
    let store = main.block_on(store(&etcd));
    let first = store.clone();
    std::thread::spawn(move || {
        let serving = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut r = request("a", "first");
        serving
            .block_on(first.enqueue_request(&mut r, Duration::from_secs(600)))
            .unwrap();
    })
    .join()
    .unwrap();
    let mut r = request("a", "after");
    main.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            store.enqueue_request(&mut r, Duration::from_secs(600)),
        )
        .await
        .expect("the write within 10 s")
        .expect("the write");
    });
    main.block_on(async { drop(etcd) });
}

#[tokio::test]
async fn a_finish_is_written_only_under_the_claim_it_was_made_with() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let (seq, record) = queued(&store, "fenced").await;
    let deadline = SystemTime::now() + Duration::from_secs(30);
    let first_lease = store.grant_claim_lease(10).await.unwrap();
    let ClaimOutcome::Claimed(mut first) = store
        .claim_request(&record, "gw-1", first_lease, deadline)
        .await
        .unwrap()
    else {
        panic!("not claimed");
    };
    // A second claimant learns who holds it.
    match store
        .claim_request(&record, "gw-2", first_lease, deadline)
        .await
        .unwrap()
    {
        ClaimOutcome::Held {
            holder, revision, ..
        } => {
            assert_eq!(holder, "gw-1");
            assert!(revision >= first.revision);
        }
        other => panic!("claimed twice: {other:?}"),
    }
    // The first gateway's lease lapses (it was paused); another takes the request over.
    store.revoke_lease(first_lease).await;
    let stale = record;
    let record = store.get_request_record("a", seq).await.unwrap().unwrap();
    assert_eq!(record.request.state, RequestState::Delivering as i32);
    assert!(record.request.attempt_deadline.is_some());
    let second_lease = store.grant_claim_lease(10).await.unwrap();
    // The record read before the takeover is stale now.
    assert!(matches!(
        store
            .claim_request(&stale, "gw-2", second_lease, deadline)
            .await
            .unwrap(),
        ClaimOutcome::Changed
    ));
    let mut second = claim(&store, &record, "gw-2", second_lease).await;
    // The first one's late finish changes nothing.
    first.stored.request.state = RequestState::Dead as i32;
    assert_eq!(
        store.finish_request(&first, None).await.unwrap(),
        Finished::LostClaim
    );
    second.stored.request.state = RequestState::Delivered as i32;
    let answer = StoredResponse {
        status: 200,
        body: b"ok".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        store.finish_request(&second, Some(&answer)).await.unwrap(),
        Finished::Done
    );
    let stored = store.get_request("fenced").await.unwrap().request;
    assert_eq!(stored.state, RequestState::Delivered as i32);
    assert_eq!(stored.attempts, 2);
    assert_eq!(stored.response.unwrap().body, b"ok");
    // A claim made with a record kept from before learns that the request no longer waits
    // (a replayer whose watch lags takes it out of its index, rather than try it again).
    assert!(matches!(
        store
            .claim_request(&record, "gw-3", second_lease, deadline)
            .await
            .unwrap(),
        ClaimOutcome::Gone { .. }
    ));
}

#[tokio::test]
async fn a_small_answer_rides_in_the_finished_record_and_a_large_one_is_kept_apart_its_status_in_the_record_either_way(
) {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let mut etcd_client = etcd.client().await.unwrap();
    let lease = store.grant_claim_lease(10).await.unwrap();
    let inline = berth_store::requests::INLINE_BODY_BYTES;
    // The body is its id (a few bytes): an answer of the rest of the inline size rides along,
    // one byte more is kept apart.
    for (id, size, apart) in [("small", inline - 5, false), ("large", inline - 4, true)] {
        let (seq, record) = queued(&store, id).await;
        let mut claim = claim(&store, &record, "gw", lease).await;
        claim.stored.request.state = RequestState::Delivered as i32;
        let answer = StoredResponse {
            status: 201,
            body: vec![b'x'; size],
            ..Default::default()
        };
        assert_eq!(
            store.finish_request(&claim, Some(&answer)).await.unwrap(),
            Finished::Done
        );
        let kept = etcd_client
            .get(store.keys().request_answer("a", seq), None)
            .await
            .unwrap();
        assert_eq!(kept.kvs().len(), usize::from(apart), "{id}: kept apart?");
        // Read back whole either way, and counted whole by retention.
        let stored = store.get_request(id).await.unwrap().request;
        assert_eq!(stored.response.as_ref(), Some(&answer), "{id}");
        assert_eq!(
            store.get_request_answer("a", seq).await.unwrap().is_some(),
            apart,
            "{id}: only a large answer has a key of its own"
        );
        let marker = etcd_client
            .get(store.keys().finished("a", seq), None)
            .await
            .unwrap();
        let bytes = String::from_utf8_lossy(marker.kvs()[0].value()).into_owned();
        assert_eq!(bytes, (id.len() + size).to_string(), "{id}");
        // A listing reads records alone: the status is there, whichever way the answer went.
        let (listed, _) = store.list_requests(Some("a"), 0, 10, "").await.unwrap();
        let listed = listed.iter().find(|r| r.id == id).expect("listed");
        assert_eq!(listed.response_status, 201, "{id}");
    }
}

#[tokio::test]
async fn a_claim_left_behind_is_let_go_only_under_the_lease_it_was_made_with() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let (seq, record) = queued(&store, "left").await;
    let deadline = SystemTime::now() + Duration::from_secs(30);
    let (ours, theirs) = (
        store.grant_claim_lease(10).await.unwrap(),
        store.grant_claim_lease(10).await.unwrap(),
    );
    assert!(matches!(
        store
            .claim_request(&record, "gw-1", ours, deadline)
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    let record = store.get_request_record("a", seq).await.unwrap().unwrap();
    // Released under another lease (a replayer whose view of the claims lags): it stands.
    store.release_claim("a", seq, theirs).await.unwrap();
    match store
        .claim_request(&record, "gw-2", theirs, deadline)
        .await
        .unwrap()
    {
        ClaimOutcome::Held { holder, .. } => assert_eq!(holder, "gw-1"),
        other => panic!("a claim let go under another lease: {other:?}"),
    }
    // Under its own lease it goes, and the request can be claimed again.
    store.release_claim("a", seq, ours).await.unwrap();
    assert!(matches!(
        store
            .claim_request(&record, "gw-2", theirs, deadline)
            .await
            .unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

#[tokio::test]
async fn listing_pages_and_retention_drops_the_oldest_with_their_keys() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut r = request("a", &format!("r{i}"));
        if i < 5 {
            // Answered directly and kept for an Idempotency-Key.
            r.state = RequestState::Delivered as i32;
            r.idempotency_key = format!("key-{i}");
            let digest = berth_store::requests::key_digest(&r.idempotency_key);
            let held = store
                .take_idempotency_key("a", &digest, &r.id, "p", Duration::from_secs(600))
                .await
                .unwrap();
            assert!(held.is_none());
            r.response = Some(StoredResponse {
                status: 200,
                ..Default::default()
            });
        }
        store
            .enqueue_request(&mut r, Duration::from_secs(600))
            .await
            .unwrap();
        ids.push(r.id);
    }
    let (page, token) = store.list_requests(Some("a"), 0, 3, "").await.unwrap();
    assert_eq!(page.len(), 3);
    let (page2, token2) = store.list_requests(Some("a"), 0, 3, &token).await.unwrap();
    let (page3, token3) = store.list_requests(Some("a"), 0, 3, &token2).await.unwrap();
    let all: Vec<String> = [page, page2, page3]
        .concat()
        .into_iter()
        .map(|r| r.id)
        .collect();
    // Waiting ones first (r5, r6), then finished ones (r0 to r4), each oldest first.
    let waiting_first: Vec<String> = ids[5..].iter().chain(&ids[..5]).cloned().collect();
    assert_eq!(all, waiting_first);
    assert!(token3.is_empty());
    let (queued, _) = store
        .list_requests(Some("a"), RequestState::Queued as i32, 10, "")
        .await
        .unwrap();
    assert_eq!(queued.len(), 2);
    assert!(store
        .list_requests(Some("a"), 0, 3, "x/../b/1")
        .await
        .is_err());

    let bounds = Retention {
        per_agent_count: 2,
        per_agent_bytes: u64::MAX,
        total_count: u64::MAX,
        total_bytes: u64::MAX,
    };
    assert_eq!(store.trim_finished(&bounds).await.unwrap(), 3);
    for (i, id) in ids.iter().enumerate() {
        let kept = store.get_request(id).await.is_ok();
        // The three oldest finished ones go; the two newest finished and the queued stay.
        assert_eq!(kept, i >= 3, "{id}");
    }
    // Their keys went with them; the kept ones' stay held.
    let take = |key: &str| {
        let (store, digest) = (store.clone(), berth_store::requests::key_digest(key));
        async move {
            store
                .take_idempotency_key("a", &digest, "new", "p", Duration::from_secs(600))
                .await
                .unwrap()
        }
    };
    assert!(
        take("key-0").await.is_none(),
        "the dropped request's key is free"
    );
    assert_eq!(take("key-4").await.unwrap().holder, "r4");
    assert_eq!(store.trim_finished(&bounds).await.unwrap(), 0);
}

/// Claims `id`'s record (queued for agent `agent`) and finishes it in `state`.
async fn finish_as(store: &Store, agent: &str, id: &str, state: RequestState) {
    let mut r = request(agent, id);
    store
        .enqueue_request(&mut r, Duration::from_secs(600))
        .await
        .unwrap();
    let record = store
        .get_request_record(agent, r.seq)
        .await
        .unwrap()
        .unwrap();
    let lease = store.grant_claim_lease(10).await.unwrap();
    let mut claim = claim(store, &record, "gw", lease).await;
    claim.stored.request.state = state as i32;
    assert_eq!(
        store.finish_request(&claim, None).await.unwrap(),
        Finished::Done
    );
}

async fn dead_ids(store: &Store, agent: Option<&str>, limit: usize) -> Vec<String> {
    let (mut ids, mut token) = (Vec::new(), String::new());
    loop {
        let (page, next) = store
            .list_requests(agent, RequestState::Dead as i32, limit, &token)
            .await
            .unwrap();
        assert!(page.len() <= limit);
        assert!(page.iter().all(|r| r.state == RequestState::Dead as i32));
        ids.extend(page.into_iter().map(|r| r.id));
        if next.is_empty() {
            return ids;
        }
        token = next;
    }
}

#[tokio::test]
async fn dead_letters_are_listed_from_their_index_which_follows_their_records() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    for (agent, id, state) in [
        ("a", "d0", RequestState::Dead),
        ("a", "ok0", RequestState::Delivered),
        ("a", "d1", RequestState::Dead),
        ("a", "d2", RequestState::Dead),
        ("b", "d3", RequestState::Dead),
    ] {
        finish_as(&store, agent, id, state).await;
    }
    let mut waiting = request("a", "waiting");
    store
        .enqueue_request(&mut waiting, Duration::from_secs(600))
        .await
        .unwrap();
    // Paged, oldest first per agent; the delivered and the waiting ones are not dead.
    assert_eq!(dead_ids(&store, Some("a"), 2).await, ["d0", "d1", "d2"]);
    assert_eq!(dead_ids(&store, None, 1).await, ["d0", "d1", "d2", "d3"]);
    assert!(store
        .list_requests(None, RequestState::Dead as i32, 1, "f:a/1")
        .await
        .is_err());
    // Retried, it waits again; dropped, it is gone: neither is dead any more.
    store.retry_request("d1").await.unwrap();
    store.drop_request("d2").await.unwrap();
    assert_eq!(dead_ids(&store, None, 10).await, ["d0", "d3"]);
    let mut raw = etcd.client().await.unwrap();
    let left = raw
        .get(
            "/t/dead/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(left.kvs().len(), 2, "the index holds only what is dead");

    // A dead letter stored before the index (by an earlier version) is indexed once.
    raw.delete(
        "/t/dead/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    assert!(dead_ids(&store, None, 10).await.is_empty());
    assert_eq!(store.index_dead_letters().await.unwrap(), 2);
    assert_eq!(dead_ids(&store, None, 10).await, ["d0", "d3"]);
    finish_as(&store, "a", "d4", RequestState::Dead).await;
    assert_eq!(
        store.index_dead_letters().await.unwrap(),
        0,
        "once per store"
    );
    assert_eq!(dead_ids(&store, None, 10).await, ["d0", "d4", "d3"]);
}

#[tokio::test]
async fn an_orphaned_key_is_let_go_only_as_it_was_seen() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(600);
    let digest = berth_store::requests::key_digest("k");
    // A gateway took the key for "ghost" and died before storing anything.
    assert!(store
        .take_idempotency_key("a", &digest, "ghost", "p", ttl)
        .await
        .unwrap()
        .is_none());
    let held = store
        .take_idempotency_key("a", &digest, "next", "p", ttl)
        .await
        .unwrap()
        .expect("held by the ghost");
    assert_eq!(held.holder, "ghost");
    assert!(held.age < Duration::from_secs(60));
    assert!(
        store.get_request("ghost").await.is_err(),
        "no request behind it"
    );
    assert!(store.release_orphan_key("a", &digest, &held).await.unwrap());
    // Taken again meanwhile by someone else: a stale view lets nothing go.
    assert!(store
        .take_idempotency_key("a", &digest, "next", "p", ttl)
        .await
        .unwrap()
        .is_none());
    assert!(!store.release_orphan_key("a", &digest, &held).await.unwrap());
    let holder = store
        .take_idempotency_key("a", &digest, "third", "p", ttl)
        .await
        .unwrap()
        .expect("held by next");
    assert_eq!(holder.holder, "next");
}

#[tokio::test]
async fn a_key_is_completed_with_its_payload_by_its_holder_alone_and_keeps_its_lease() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let mut client = etcd.client().await.unwrap();
    let ttl = Duration::from_secs(600);
    let digest = berth_store::requests::key_digest("k");
    let at = format!("/t/idempotency/a/{digest}");
    let lease_of = |client: &mut etcd_client::Client| {
        let (mut client, at) = (client.clone(), at.clone());
        async move { client.get(at, None).await.unwrap().kvs()[0].lease() }
    };
    // Taken while its body streams: the payload without the body.
    assert!(store
        .take_idempotency_key("a", &digest, "first", "p:head", ttl)
        .await
        .unwrap()
        .is_none());
    let lease = lease_of(&mut client).await;
    assert_ne!(lease, 0);
    assert!(!store
        .complete_idempotency_key("a", &digest, "other", "whole")
        .await
        .unwrap());
    assert!(store
        .complete_idempotency_key("a", &digest, "first", "whole")
        .await
        .unwrap());
    let held = store
        .take_idempotency_key("a", &digest, "next", "x", ttl)
        .await
        .unwrap()
        .expect("held by first");
    assert_eq!(
        (held.holder.as_str(), held.payload.as_str()),
        ("first", "whole")
    );
    assert!(
        held.age < Duration::from_secs(60),
        "the time it was taken kept"
    );
    assert_eq!(lease_of(&mut client).await, lease, "under the same lease");
    // Let go meanwhile: nothing to complete.
    store.release_idempotency_key("a", &digest).await.unwrap();
    assert!(!store
        .complete_idempotency_key("a", &digest, "first", "whole")
        .await
        .unwrap());
}

#[tokio::test]
async fn a_positional_id_is_its_place_with_no_index_and_a_chosen_id_is_indexed() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let mut client = etcd.client().await.unwrap();
    let ttl = Duration::from_secs(600);
    let index_keys = |client: &mut etcd_client::Client| {
        let mut client = client.clone();
        async move {
            client
                .get(
                    "/t/request-ids/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_keys_only(),
                    ),
                )
                .await
                .unwrap()
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .collect::<Vec<_>>()
        }
    };
    // The gateway's id names the agent and the place: stored there, found there, no index.
    let seq = berth_store::requests::new_seq();
    let id = berth_proto::request::positional_id("a", seq);
    let mut r = request("a", &id);
    store.enqueue_request(&mut r, ttl).await.unwrap();
    assert_eq!(r.seq, seq, "the id's place is used");
    assert_eq!(
        store.get_request(&id).await.unwrap().request.body,
        id.as_bytes()
    );
    assert!(index_keys(&mut client).await.is_empty());
    // The same id again is refused, not stored at a new place.
    let mut again = request("a", &id);
    assert!(matches!(
        store.enqueue_request(&mut again, ttl).await,
        Err(berth_store::StoreError::AlreadyExists { .. })
    ));
    // An id a client chose (one naming another agent too) is indexed and found by it.
    for chosen in [
        "client-chosen-1",
        &berth_proto::request::positional_id("b", seq),
    ] {
        let mut r = request("a", chosen);
        store.enqueue_request(&mut r, ttl).await.unwrap();
        assert_ne!(r.seq, seq);
        assert_eq!(
            store.get_request(chosen).await.unwrap().request.agent,
            "a",
            "{chosen}"
        );
    }
    assert_eq!(index_keys(&mut client).await.len(), 2);
    // Dropped, a positional request is gone whole.
    store.drop_request(&id).await.unwrap();
    assert!(matches!(
        store.get_request(&id).await,
        Err(berth_store::StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn one_gateway_replays_an_agent_until_it_gives_it_back_or_its_lease_ends() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let a = store.grant_claim_lease(60).await.unwrap();
    let b = store.grant_claim_lease(60).await.unwrap();
    // Free: taken. Taken again by its holder: still its own.
    assert_eq!(store.take_replay("x", "ga", a).await.unwrap().0, None);
    assert_eq!(store.take_replay("x", "ga", a).await.unwrap().0, None);
    // Another gateway is told who has it; another agent is free for it.
    assert_eq!(
        store.take_replay("x", "gb", b).await.unwrap().0.as_deref(),
        Some("ga")
    );
    assert_eq!(store.take_replay("y", "gb", b).await.unwrap().0, None);
    // Only its holder gives it back.
    store.release_replay("x", "gb").await.unwrap();
    assert_eq!(
        store.take_replay("x", "gb", b).await.unwrap().0.as_deref(),
        Some("ga")
    );
    store.release_replay("x", "ga").await.unwrap();
    assert_eq!(store.take_replay("x", "gb", b).await.unwrap().0, None);
    // A gateway whose lease ends (stopped, or paused past it) lets go of what it replays.
    store.revoke_lease(b).await;
    assert_eq!(store.take_replay("x", "ga", a).await.unwrap().0, None);
    assert_eq!(store.take_replay("y", "ga", a).await.unwrap().0, None);
}

#[tokio::test]
async fn an_id_a_reader_found_no_request_under_is_never_stored_afterwards() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(600);
    // Asked about before its write is applied (a gateway answered 503 with the id): settled.
    let seq = berth_store::requests::new_seq();
    let id = berth_proto::request::positional_id("a", seq);
    let asked = store.get_request_settled(&id).await;
    assert!(
        matches!(asked, Err(berth_store::StoreError::NotFound { .. })),
        "{asked:?}"
    );
    // The write etcd applies late: refused, so the answer above stays true.
    let mut late = request("a", &id);
    let stored = store.enqueue_request(&mut late, ttl).await;
    assert!(stored.is_err(), "a settled id was stored: {stored:?}");
    assert!(store.get_request_record("a", seq).await.unwrap().is_none());
    assert!(matches!(
        store.get_request_settled(&id).await,
        Err(berth_store::StoreError::NotFound { .. })
    ));
    // A request stored under its own positional id is found by the same read, and a settled
    // read of it changes nothing.
    let next = berth_store::requests::new_seq();
    let id = berth_proto::request::positional_id("a", next);
    let mut r = request("a", &id);
    store.enqueue_request(&mut r, ttl).await.unwrap();
    assert_eq!(store.get_request_settled(&id).await.unwrap().request.id, id);
    // Without a settled read, a request not yet written is still stored when it comes.
    let later = berth_store::requests::new_seq();
    let id = berth_proto::request::positional_id("a", later);
    assert!(matches!(
        store.get_request(&id).await,
        Err(berth_store::StoreError::NotFound { .. })
    ));
    let mut r = request("a", &id);
    store.enqueue_request(&mut r, ttl).await.unwrap();
    assert_eq!(store.get_request(&id).await.unwrap().request.id, id);
}

/// A lease that ended while no keep-alive stream was open (etcd stood still or restarted past
/// its TTL, and the stream broke meanwhile) is told as gone, not as etcd out of reach: its
/// holder must take a new lease, for no renewal of this one can succeed.
#[tokio::test]
async fn a_renewal_of_a_lease_that_ended_while_its_stream_was_closed_says_it_is_gone() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let lease = store.grant_lease(30).await.unwrap();
    let mut renewer = store.lease_renewer(lease);
    renewer.renew().await.unwrap();
    // On an open stream, etcd answers the renewal of a revoked lease with TTL 0.
    store.revoke_lease(lease).await;
    assert!(matches!(
        renewer.renew().await,
        Err(berth_store::StoreError::NotFound { .. })
    ));
    // On a stream opened after it ended, the opening itself fails; again and again alike.
    for _ in 0..2 {
        let mut reopened = store.lease_renewer(lease);
        assert!(matches!(
            reopened.renew_within(Duration::from_secs(5)).await,
            Err(berth_store::StoreError::NotFound { .. })
        ));
    }
    // A live lease still renews on a stream opened anew.
    let live = store.grant_lease(30).await.unwrap();
    let mut renewer = store.lease_renewer(live);
    renewer.renew().await.unwrap();
    renewer.renew().await.unwrap();
}

#[tokio::test]
async fn a_leader_whose_term_ended_writes_nothing_over_the_next_one() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let placement = |node: &str| Placement {
        node: node.into(),
        assignment: berth_proto::v1::Assignment {
            replica: "r-0".into(),
            spec: Some(berth_proto::v1::AgentSpec {
                name: "r".into(),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    let placed = |node: &str| {
        let (store, node) = (store.clone(), node.to_string());
        async move {
            let (placements, _) = store.list_placements(Some(&node)).await.unwrap();
            placements.len()
        }
    };
    let first_lease = store.grant_lease(5).await.unwrap();
    assert!(store.try_lead("first", first_lease).await.unwrap());
    let first = store.fenced(first_lease);
    first.put_placements(&[placement("n1")]).await.unwrap();
    assert_eq!(placed("n1").await, 1);

    // The first leader stands still past its lease; a second one leads.
    store.revoke_lease(first_lease).await;
    let second_lease = store.grant_lease(5).await.unwrap();
    assert!(store.try_lead("second", second_lease).await.unwrap());
    let second = store.fenced(second_lease);
    second.put_placements(&[placement("n2")]).await.unwrap();

    // The first resumes in the middle of its pass: none of its writes is applied.
    let not_leader = |r: Result<(), StoreError>| {
        assert!(
            matches!(r, Err(StoreError::NotLeader { lease }) if lease == first_lease),
            "{r:?}"
        )
    };
    not_leader(first.put_placements(&[placement("n3")]).await);
    not_leader(first.delete_placement("n2", "r", "r-0").await);
    let status = berth_proto::v1::AutoscaleStatus {
        desired_replicas: 7,
        ..Default::default()
    };
    not_leader(first.put_autoscale_status("r", &status).await);
    let node = berth_proto::v1::Node {
        name: "n2".into(),
        ..Default::default()
    };
    let node_lease = store.grant_lease(30).await.unwrap();
    store.put_node(&node, node_lease).await.unwrap();
    let (_, revision, _) = store
        .list_node_records()
        .await
        .unwrap()
        .into_iter()
        .find(|(n, _, _)| n.name == "n2")
        .unwrap();
    assert!(matches!(
        first.mark_node_unknown(&node, revision, node_lease).await,
        Err(StoreError::NotLeader { .. })
    ));
    assert_eq!(placed("n3").await, 0);
    assert_eq!(placed("n2").await, 1);
    let mut raw = etcd.client().await.unwrap();
    assert!(raw
        .get("/t/autoscale/r", None)
        .await
        .unwrap()
        .kvs()
        .is_empty());

    // The second's writes go; its own compares are told apart from the fence.
    second.delete_placement("n2", "r", "r-0").await.unwrap();
    assert_eq!(placed("n2").await, 0);
    second.put_autoscale_status("r", &status).await.unwrap();
    assert!(!second
        .mark_node_unknown(&node, revision - 1, node_lease)
        .await
        .unwrap());
    assert!(second
        .mark_node_unknown(&node, revision, node_lease)
        .await
        .unwrap());
    // An unfenced store (the API, the node sessions) writes as before.
    store.put_placements(&[placement("n4")]).await.unwrap();
    assert_eq!(placed("n4").await, 1);
}

/// Keys under `prefix`, in order.
async fn keys_under(etcd: &Etcd, prefix: &str) -> Vec<String> {
    let mut client = etcd.client().await.unwrap();
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    client
        .get(prefix, Some(options))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

/// A body over one etcd write is kept in pieces written before its record, under a token of
/// its own write: two writes racing for one place (the same positional id) never mix their
/// pieces, the loser's and those of a keyed write whose key is held are deleted, and the body
/// read back is the winner's, whole and in order.
#[tokio::test]
async fn bodies_in_pieces_are_their_own_writes_alone() {
    let etcd = Etcd::start().await.unwrap();
    let store = store(&etcd).await;
    let ttl = Duration::from_secs(600);
    let seq = berth_store::requests::new_seq();
    let id = berth_proto::request::positional_id("a", seq);
    let body = |fill: u8| -> Vec<u8> {
        (0..3 * 1024 * 1024 + 5)
            .map(|i| fill.wrapping_add((i % 249) as u8))
            .collect()
    };
    let (mut x, mut y) = (request("a", &id), request("a", &id));
    (x.body, y.body) = (body(1), body(2));
    let (rx, ry) = tokio::join!(
        store.enqueue_request(&mut x, ttl),
        store.enqueue_request(&mut y, ttl)
    );
    let winner = match (&rx, &ry) {
        (Ok(()), Err(StoreError::AlreadyExists { .. })) => &x,
        (Err(StoreError::AlreadyExists { .. }), Ok(())) => &y,
        other => panic!("one write stores the request, the other is refused: {other:?}"),
    };
    let record = store.get_request_record("a", seq).await.unwrap().unwrap();
    assert_eq!(record.request.body_bytes, winner.body.len() as u64);
    let read = store.get_request_body(&record.request).await.unwrap();
    assert!(
        read.as_ref() == Some(&winner.body),
        "the winner's body, whole"
    );
    // The first MiB and three pieces (1 MiB, 1 MiB, 5 bytes), the loser's gone.
    assert_eq!(keys_under(&etcd, "/t/request-bodies/").await.len(), 4);

    // A keyed request whose key is held stores nothing, and leaves no pieces behind.
    let digest = berth_store::requests::key_digest("k");
    let mut first = request("a", "keyed-1");
    first.body = body(3);
    assert!(store
        .enqueue_keyed_request(&mut first, ttl, &digest, "p")
        .await
        .unwrap()
        .is_none());
    let mut second = request("a", "keyed-2");
    second.body = body(4);
    let held = store
        .enqueue_keyed_request(&mut second, ttl, &digest, "p")
        .await
        .unwrap();
    assert_eq!(held.map(|h| h.holder).as_deref(), Some("keyed-1"));
    assert_eq!(keys_under(&etcd, "/t/request-bodies/").await.len(), 8);

    // Dropped, a request's pieces go with it.
    store.drop_request(&id).await.unwrap();
    store.drop_request("keyed-1").await.unwrap();
    assert!(keys_under(&etcd, "/t/request-bodies/").await.is_empty());
}
