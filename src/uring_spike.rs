//! SPIKE, not for merge: plain TCP reads and writes of the HTTP/1 path through a per-worker
//! io_uring, submitted in one batch when the worker's loop runs out of work, with an
//! optional wait for completions (FULCRUM_URING=min_in_flight,percent,max_wait_us).
//! An operation dropped in flight leaves its buffer to the kernel: unsound, measured only.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
    orphan: bool,
}

struct Driver {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
    unsubmitted: usize,
    min_in_flight: usize,
    percent: usize,
    max_wait: Duration,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
    static ON: Cell<bool> = const { Cell::new(false) };
}

pub fn enabled() -> bool {
    ON.with(Cell::get)
}

/// Sets up this worker's ring if FULCRUM_URING is set; returns the eventfd completions
/// signal, for the reaper task.
pub fn init_worker() -> Option<RawFd> {
    let spec = std::env::var("FULCRUM_URING").ok()?;
    let parts: Vec<usize> = spec
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let (min_in_flight, percent, max_us) = match parts[..] {
        [a, b, c] => (a, b, c),
        _ => (usize::MAX, 0, 0),
    };
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(4096)
        .expect("io_uring");
    // SAFETY: plain syscall.
    let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    ring.submitter().register_eventfd(efd).expect("eventfd");
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            unsubmitted: 0,
            min_in_flight,
            percent,
            max_wait: Duration::from_micros(max_us as u64),
        })
    });
    ON.with(|o| o.set(true));
    Some(efd)
}

/// Reaps completions whenever the ring's eventfd says some arrived.
pub async fn reaper(efd: RawFd) {
    let fd = tokio::io::unix::AsyncFd::new(efd).expect("asyncfd");
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into n.
        unsafe { libc::read(efd, (&raw mut n).cast(), 8) };
        guard.clear_ready();
        DRIVER.with(|d| {
            if let Some(d) = d.borrow_mut().as_mut() {
                d.reap();
            }
        });
    }
}

impl Driver {
    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let k = cqe.user_data() as usize;
            if k == usize::MAX {
                continue;
            }
            self.in_flight -= 1;
            let slot = &mut self.slots[k];
            if slot.orphan {
                slot.orphan = false;
                self.free.push(k);
                continue;
            }
            slot.result = Some(cqe.result());
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: the buffers the entry points at stay until its completion (spike: not
            // if the future is dropped).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            let _ = self.ring.submit();
            self.unsubmitted = 0;
        }
    }
}

/// The loop's hook before it blocks: submit what gathered, maybe wait for some of it.
pub fn before_park() {
    DRIVER.with(|d| {
        let mut d = d.borrow_mut();
        let Some(d) = d.as_mut() else { return };
        let want = if d.in_flight >= d.min_in_flight {
            (d.in_flight * d.percent / 100).max(1)
        } else {
            0
        };
        if want > 0 {
            let ts = types::Timespec::from(d.max_wait);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = d.ring.submitter().submit_with_args(want, &args);
        } else if d.unsubmitted > 0 {
            let _ = d.ring.submit();
        }
        d.unsubmitted = 0;
        d.reap();
    });
}

pub struct Op {
    sqe: Option<squeue::Entry>,
    key: Option<usize>,
}

pub fn recv(fd: RawFd, ptr: *mut u8, len: usize) -> Op {
    Op {
        sqe: Some(opcode::Recv::new(types::Fd(fd), ptr, len as u32).build()),
        key: None,
    }
}

pub fn send(fd: RawFd, data: &[u8]) -> Op {
    Op {
        sqe: Some(
            opcode::Send::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build(),
        ),
        key: None,
    }
}

impl Future for Op {
    type Output = io::Result<usize>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        DRIVER.with(|d| {
            let mut d = d.borrow_mut();
            let d = d.as_mut().expect("uring on this worker");
            match self.key {
                None => {
                    let k = d.free.pop().unwrap_or_else(|| {
                        d.slots.push(Slot {
                            result: None,
                            waker: None,
                            orphan: false,
                        });
                        d.slots.len() - 1
                    });
                    d.slots[k].waker = Some(cx.waker().clone());
                    let sqe = self.sqe.take().expect("fresh op").user_data(k as u64);
                    d.push(sqe);
                    d.in_flight += 1;
                    self.key = Some(k);
                    Poll::Pending
                }
                Some(k) => match d.slots[k].result.take() {
                    Some(r) => {
                        d.free.push(k);
                        self.key = None;
                        self.sqe = None;
                        Poll::Ready(if r < 0 {
                            Err(io::Error::from_raw_os_error(-r))
                        } else {
                            Ok(r as usize)
                        })
                    }
                    None => {
                        d.slots[k].waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                },
            }
        })
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let Some(k) = self.key {
            DRIVER.with(|d| {
                if let Some(d) = d.borrow_mut().as_mut() {
                    if d.slots[k].result.take().is_some() {
                        d.free.push(k);
                        return;
                    }
                    d.slots[k].orphan = true;
                    d.slots[k].waker = None;
                    let cancel = opcode::AsyncCancel::new(k as u64)
                        .build()
                        .user_data(u64::MAX);
                    d.push(cancel);
                }
            });
        }
    }
}
