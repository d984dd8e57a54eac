//! A prototype for issue 17's decision, not part of the binding: the hot
//! calls of the Python binding — `request`, a handler answering a request,
//! the dispatch loop — as a PyO3 extension module (`_fast`) over the Rust
//! crate itself, to measure beside the ctypes binding over the C ABI
//! (ffi/python/bench/request.py runs both).
//!
//! Only what the benchmark needs: [`Worker::from_env`], `on(event,
//! handler)` with `handler(data: bytes, sender_slot: int) -> bytes`,
//! `request`, `run`, `peer`. Every wait releases the GIL (as ctypes does
//! around a foreign call), and a handler takes it back to run.

use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use shmcluster::{Messenger, WorkerState};

/// A `&mut Messenger` crossing into `Python::allow_threads`, which wants
/// its closure `Send`.
struct Lent(*mut Messenger);

// SAFETY: the pointer is used only inside the `allow_threads` closure,
// which runs synchronously on the thread that owns the (unsendable)
// `Worker` and lent it: the messenger never changes thread.
unsafe impl Send for Lent {}

impl Lent {
    /// # Safety
    /// The messenger must outlive the returned borrow `'a` and nobody else
    /// may use it meanwhile (see the `Send` impl).
    unsafe fn get<'a>(self) -> &'a mut Messenger {
        // SAFETY: as the caller promised.
        unsafe { &mut *self.0 }
    }
}

/// A worker spawned by `shmcluster run`, driven from the Python thread
/// that made it (an unsendable class: PyO3 refuses other threads).
#[pyclass(unsendable)]
struct Worker {
    m: Messenger,
}

fn runtime(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

impl Worker {
    /// Runs `f` on the messenger with the GIL released.
    fn without_gil<T: Send>(&mut self, py: Python<'_>, f: impl FnOnce(&mut Messenger) -> T + Send) -> T {
        let lent = Lent(&mut self.m);
        py.allow_threads(move || {
            // SAFETY: `self.m` is borrowed mutably for this whole call and
            // the closure runs now, on this thread.
            let m = unsafe { lent.get() };
            f(m)
        })
    }
}

#[pymethods]
impl Worker {
    /// Attaches the worker `shmcluster run` spawned this process as.
    #[staticmethod]
    fn from_env() -> PyResult<Self> {
        let worker = shmcluster::Worker::from_env().map_err(runtime)?;
        Ok(Self {
            m: Messenger::new(worker),
        })
    }

    #[getter]
    fn slot(&self) -> u32 {
        self.m.worker().slot()
    }

    #[getter]
    fn index(&self) -> u32 {
        self.m.worker().index()
    }

    fn ready(&self) {
        self.m.worker().ready();
    }

    fn should_stop(&self) -> bool {
        self.m.worker().should_stop()
    }

    /// Registers `handler(data, sender_slot) -> bytes` for requests of
    /// `event`; an exception answers `HandlerFailed` with its text.
    fn on(&mut self, event: &str, handler: PyObject) -> PyResult<()> {
        self.m
            .on_request_async_bytes(event, move |ctx, data, reply| {
                let answer = Python::with_gil(|py| {
                    let out = handler.call1(py, (PyBytes::new(py, data), ctx.sender().slot))?;
                    let bytes = out.downcast_bound::<PyBytes>(py)?;
                    Ok::<_, PyErr>(bytes.as_bytes().to_vec())
                });
                reply.send(answer.map_err(|e| e.to_string()));
            })
            .map(|_| ())
            .map_err(runtime)
    }

    /// Asks worker `slot`'s first handler for `event`; its answer's bytes,
    /// within `timeout` seconds.
    #[pyo3(signature = (slot, event, data, timeout = 10.0))]
    fn request<'py>(
        &mut self,
        py: Python<'py>,
        slot: u32,
        event: &str,
        data: &[u8],
        timeout: f64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let got = self.without_gil(py, |m| {
            m.request_bytes(slot, event, data, deadline)
                .map_err(|e| e.to_string())
        });
        match got {
            Ok(bytes) => Ok(PyBytes::new(py, &bytes)),
            Err(e) => Err(PyRuntimeError::new_err(e)),
        }
    }

    /// Serves (runs the handlers) until the worker is told to stop.
    fn run(&mut self, py: Python<'_>) -> PyResult<()> {
        self.without_gil(py, |m| m.run().map_err(|e| e.to_string()))
            .map_err(PyRuntimeError::new_err)
    }

    /// Dispatches until another worker is ready; returns its slot.
    #[pyo3(signature = (timeout = 10.0))]
    fn peer(&mut self, py: Python<'_>, timeout: f64) -> PyResult<u32> {
        let until = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
        let me = self.m.worker().slot();
        loop {
            let found = self
                .m
                .worker()
                .peers()
                .iter()
                .find(|p| p.slot != me && p.state == WorkerState::Ready)
                .map(|p| p.slot);
            if let Some(slot) = found {
                return Ok(slot);
            }
            if Instant::now() >= until {
                return Err(PyTimeoutError::new_err("no other worker ready in time"));
            }
            self.without_gil(py, |m| {
                m.poll(Duration::from_millis(1))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .map_err(PyRuntimeError::new_err)?;
        }
    }
}

/// The module: `from _fast import Worker`.
#[pymodule]
fn _fast(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Worker>()
}
