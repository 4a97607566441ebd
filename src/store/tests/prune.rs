//! `prune` per series: tags of one repository name are one series,
//! untagged snapshots one series per container; keep-last and keep-within act
//! within each series, and `NAME:latest` is always kept.

use std::time::Duration;

use super::*;

/// Ingests `image` for `container` with `tags`; a short sleep keeps the
/// `created` times (nanosecond RFC 3339) in ingest order.
fn add(fx: &Fixture, name: &str, seed: u64, container: &str, tags: &[&str]) -> SnapshotId {
    let img = fx.image(name, seed, 16);
    let id = fx
        .store
        .ingest(
            SnapshotInput {
                image_dir: &img,
                config_json: CONFIG_JSON,
                container_id: container,
                metadata: serde_json::json!({}),
                tags: tags.iter().map(|s| s.to_string()).collect(),
            },
            &IngestOptions::default(),
        )
        .expect("ingest")
        .id;
    std::thread::sleep(Duration::from_millis(5));
    id
}

#[test]
fn keep_last_acts_per_tag_name_and_per_container_for_untagged() {
    let fx = Fixture::new();
    // redis:v1..v5 from two different containers: one series "redis".
    let redis: Vec<SnapshotId> = (1..=5u64)
        .map(|i| {
            let c = if i % 2 == 0 { "r-a" } else { "r-b" };
            add(&fx, &format!("r{i}"), i, c, &[&format!("redis:v{i}")])
        })
        .collect();
    let pg1 = add(&fx, "p1", 11, "pg", &["pg:v1"]);
    let pg2 = add(&fx, "p2", 12, "pg", &["pg:v2"]);
    // Untagged: two of container u1, one of u2.
    let u1a = add(&fx, "u1a", 21, "u1", &[]);
    let u1b = add(&fx, "u1b", 22, "u1", &[]);
    let u2 = add(&fx, "u2", 23, "u2", &[]);
    // An old snapshot named by `web` (web:latest) and a newer web:v2.
    let web_latest = add(&fx, "w1", 31, "w", &["web"]);
    let web2 = add(&fx, "w2", 32, "w", &["web:v2"]);

    let mut dry = fx.store.prune(Some(1), None, true).expect("dry");
    dry.sort();
    let mut want = vec![redis[0], redis[1], redis[2], redis[3], pg1, u1a];
    want.sort();
    assert_eq!(dry, want);
    assert_eq!(
        fx.store.list().expect("list").len(),
        12,
        "dry run changed nothing"
    );

    let mut gone = fx.store.prune(Some(1), None, false).expect("prune");
    gone.sort();
    assert_eq!(gone, want);
    let mut left: Vec<SnapshotId> = fx
        .store
        .list()
        .expect("list")
        .iter()
        .map(|s| s.id)
        .collect();
    left.sort();
    let mut kept = vec![redis[4], pg2, u1b, u2, web_latest, web2];
    kept.sort();
    assert_eq!(left, kept);
    assert!(
        fx.store.resolve("redis:v1").is_err(),
        "the pruned tag goes too"
    );
    assert_eq!(fx.store.resolve("web").expect("web"), web_latest);
    assert!(fx.store.verify(true).expect("verify").is_empty());

    // keep-within: everything is recent; nothing goes.
    assert!(fx
        .store
        .prune(Some(0), Some(Duration::from_secs(3600)), false)
        .expect("within")
        .is_empty());
}

/// A snapshot with tags of two names is kept when either series keeps it.
#[test]
fn a_snapshot_in_two_series_is_kept_by_either() {
    let fx = Fixture::new();
    let both = add(&fx, "b", 1, "c", &["app:v1", "release:r1"]);
    let app2 = add(&fx, "a2", 2, "c", &["app:v2"]);
    let gone = fx.store.prune(Some(1), None, false).expect("prune");
    assert!(gone.is_empty(), "{gone:?}");
    let left: Vec<SnapshotId> = fx
        .store
        .list()
        .expect("list")
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, vec![both, app2]);
}
