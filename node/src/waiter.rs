//! The wake where the slot has no eventfd (a master that did not pass
//! `SHMCLUSTER_WAKE_FDS`, or `NODE_SHMCLUSTER_WAKE=thread`): a thread
//! parks on the slot's futex after each idle turn and wakes the JS thread
//! through a threadsafe function. Two wakes per message that finds the
//! loop asleep (the futex, then libuv's async handle), against the
//! eventfd's one: the fallback, as in the tokio driver.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use napi::threadsafe_function::{
    ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode,
};
use napi::{Env, JsFunction, JsUnknown};
use shmcluster::IdleWaiter;

use crate::err;

/// The longest park: the JS side's safety net turns as often anyway.
const PARK: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Arm {
    /// Bumped by [`Waiter::arm`]: one park per bump.
    armed: u64,
    stop: bool,
}

/// The waiter thread and what wakes JS.
pub(crate) struct Waiter {
    arm: Arc<(Mutex<Arm>, Condvar)>,
    tsfn: ThreadsafeFunction<(), ErrorStrategy::Fatal>,
}

impl Waiter {
    pub(crate) fn start(idle: IdleWaiter, on_wake: &JsFunction) -> napi::Result<Self> {
        // Referenced, as the eventfd's poll handle is: a worker that only
        // serves stays alive; the JS side's unref() releases it.
        let tsfn: ThreadsafeFunction<(), ErrorStrategy::Fatal> = on_wake
            .create_threadsafe_function(0, |_: ThreadSafeCallContext<()>| Ok(Vec::<JsUnknown>::new()))?;
        let arm: Arc<(Mutex<Arm>, Condvar)> = Arc::default();
        let (thread_arm, thread_tsfn) = (arm.clone(), tsfn.clone());
        std::thread::Builder::new()
            .name("shmcluster-wake".into())
            .spawn(move || {
                let mut seen = 0;
                loop {
                    {
                        let (lock, cv) = &*thread_arm;
                        let mut a = lock.lock().unwrap_or_else(|p| p.into_inner());
                        while !a.stop && a.armed == seen {
                            a = cv.wait(a).unwrap_or_else(|p| p.into_inner());
                        }
                        if a.stop {
                            return;
                        }
                        seen = a.armed;
                    }
                    idle.wait(PARK);
                    thread_tsfn.call((), ThreadsafeFunctionCallMode::NonBlocking);
                }
            })
            .map_err(|e| err("IO", format!("cannot start the wake thread: {e}")))?;
        Ok(Self { arm, tsfn })
    }

    /// After an idle turn: park once.
    pub(crate) fn arm(&self) {
        let (lock, cv) = &*self.arm;
        lock.lock().unwrap_or_else(|p| p.into_inner()).armed += 1;
        cv.notify_one();
    }

    pub(crate) fn set_ref(&mut self, env: &Env, referenced: bool) {
        let _ = if referenced {
            self.tsfn.refer(env)
        } else {
            self.tsfn.unref(env)
        };
    }

    /// Ends the thread (within one park) and releases the function.
    pub(crate) fn stop(self) {
        let (lock, cv) = &*self.arm;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_one();
        let _ = self.tsfn.abort();
    }
}
