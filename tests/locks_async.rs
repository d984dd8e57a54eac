//! `Locks::synchronize_async` (feature `tokio`): sections that cross
//! `.await` points exclude each other across tasks and threads, and a
//! cancelled or panicking section releases its lock.
#![cfg(feature = "tokio")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shmcluster::raw::{Config, Segment};
use shmcluster::testing::Watchdog;
use shmcluster::Locks;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_sections_exclude_each_other_across_awaits() {
    let _dog = Watchdog::new("async", Duration::from_secs(60));
    let seg = Segment::create(&Config::new(1)).unwrap();
    let counter = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let locks = Locks::new(&seg, 0).unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                for _ in 0..25 {
                    locks
                        .synchronize_async("n", |_| async {
                            // A read-modify-write split by an await: lost
                            // updates if two sections overlap.
                            let v = counter.load(Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_micros(50)).await;
                            counter.store(v + 1, Ordering::Relaxed);
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(counter.load(Ordering::Relaxed), 200);
    let stats = Locks::new(&seg, 0).unwrap().stats();
    assert_eq!(stats.iter().find(|s| s.name == "n").unwrap().acquisitions, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_section_releases_the_lock() {
    let _dog = Watchdog::new("async-cancel", Duration::from_secs(30));
    let seg = Segment::create(&Config::new(1)).unwrap();
    let locks = Locks::new(&seg, 0).unwrap();
    // The section never finishes by itself; the timeout drops it.
    let r = tokio::time::timeout(
        Duration::from_millis(100),
        locks.synchronize_async("c", |_| std::future::pending::<()>()),
    )
    .await;
    assert!(r.is_err(), "timed out");
    // The lock is free again (the holder thread saw the task go away).
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        locks.synchronize_async(
            "c",
            |s| async move { (s.name() == "c").then_some(s.fencing_token()) },
        ),
    )
    .await
    .expect("the lock was released")
    .unwrap();
    assert_eq!(got, Some(2), "the section's name and token");
}
