//! Relaying plain TCP: each direction reads into a user-space buffer and writes it out,
//! passing an end of stream on as a half-close like the generic copy loop in
//! [`crate::tcp`]. Readiness comes from tokio (`readable`/`writable` + `try_read`/
//! `try_write`), so a would-block clears the readiness and the task sleeps until the socket
//! is ready again.
//!
//! **Why not `splice(2)`.** The relay spliced (socket → pipe → socket) until 2026-12-05.
//! That spares the sidecar one copy in and one copy out, but it hands the sender's own
//! pages on to the receiver, so what the peers do with them grows dearer: with the sender
//! and the receiver on one host (the app next to its sidecar, or a benchmark's load core),
//! the sender and the sink spent 0.49–0.56 s of CPU per GB through the splicing sidecar
//! against 0.38–0.40 through this copy (0.41–0.47 through HAProxy, which copies), and
//! HAProxy with `option splice-request/response` costs them the same extra. The sidecar
//! pays instead (0.35–0.39 s per GB against 0.25–0.27), which is the better trade where
//! its peers' core is the limit, as on one stream; four streams at once went faster too
//! (`MODE=tcp benches/proxy_pair.sh`; the figures are in `docs/proxy.md`).
//!
//! **Buffers.** One read moves up to [`BUF_BYTES`], a socket buffer's worth: with 16 and
//! 64 KiB the sidecar spent more CPU per GB. A direction holds a buffer only while its
//! bytes move: it takes one when its socket turns readable and gives it back when a read
//! would block with nothing left to write, so an idle connection holds none. Given-back
//! buffers wait on a short per-thread list for the next direction (a fresh one is
//! allocated and zeroed; a spare is reused as it is). A direction whose receiver is slow
//! keeps its buffer until it can write, so the full-size buffers held at once are capped
//! over the whole process (`--tcp-relay-memory-mib`, 64 MiB by default, see
//! [`set_memory_limit_mib`]): past it, a direction reads through a [`SMALL_BYTES`] buffer
//! instead (HAProxy's buffer size), slower per GB but bounded.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// The most bytes one read moves (and the size of every buffer).
const BUF_BYTES: usize = 256 * 1024;

/// Most spare buffers kept per thread (1 MiB): enough for a few streams starting and
/// pausing without an allocation each time, little memory when they are gone.
const SPARE_MAX: usize = 4;

/// The default of `--tcp-relay-memory-mib`.
pub const DEFAULT_MEMORY_MIB: u64 = 64;

/// Most full-size buffers held by directions at once, over the process: 256 (64 MiB)
/// unless [`set_memory_limit_mib`] changed it.
static LARGE_MAX: AtomicUsize = AtomicUsize::new(buffers_for(DEFAULT_MEMORY_MIB));

/// How many full-size buffers `mib` MiB hold.
const fn buffers_for(mib: u64) -> usize {
    let buffers = mib.saturating_mul(1024 * 1024) / BUF_BYTES as u64;
    if buffers > usize::MAX as u64 {
        usize::MAX
    } else {
        buffers as usize
    }
}

/// Caps the memory of full-size relay buffers held at once to `mib` MiB (rounded down to
/// whole 256 KiB buffers; 0 relays everything through 16 KiB buffers). Set once at start.
pub fn set_memory_limit_mib(mib: u64) {
    LARGE_MAX.store(buffers_for(mib), Ordering::Relaxed);
}

/// The size of the buffers read through once [`LARGE_MAX`] are held.
const SMALL_BYTES: usize = 16 * 1024;

/// Full-size buffers held by directions now (not counting spares).
static LARGE_HELD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Buffers given back by directions that wait, for the next direction that reads.
    static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer a direction holds: full-size ones count against [`LARGE_MAX`] until given
/// back or dropped (a relay that ends while its bytes wait drops it).
struct Buffer(Box<[u8]>);

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.0.len() == BUF_BYTES {
            LARGE_HELD.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A spare buffer of this thread, or a new one; a small one when [`LARGE_MAX`] full-size
/// buffers are held already.
fn take_buffer() -> Buffer {
    if LARGE_HELD.fetch_add(1, Ordering::Relaxed) >= LARGE_MAX.load(Ordering::Relaxed) {
        LARGE_HELD.fetch_sub(1, Ordering::Relaxed);
        return Buffer(vec![0u8; SMALL_BYTES].into_boxed_slice());
    }
    let spare = SPARE
        .try_with(|s| s.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten();
    Buffer(spare.unwrap_or_else(|| vec![0u8; BUF_BYTES].into_boxed_slice()))
}

/// Keeps a full-size `buf` for the next direction when the spare list has room; frees it
/// otherwise.
fn give_back(mut buf: Buffer) {
    if buf.0.len() != BUF_BYTES {
        return;
    }
    // Taken out, the buffer left behind is empty, and its drop counts nothing.
    let bytes = std::mem::take(&mut buf.0);
    LARGE_HELD.fetch_sub(1, Ordering::Relaxed);
    let _ = SPARE.try_with(|s| {
        if let Ok(mut spare) = s.try_borrow_mut() {
            if spare.len() < SPARE_MAX {
                spare.push(bytes);
            }
        }
    });
}

/// Relays `a <-> b` until both directions end (or the idle timeout passes). Returns
/// (bytes a->b, bytes b->a, whether the idle timeout ended it).
pub(crate) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    idle: Option<Duration>,
) -> (u64, u64, bool) {
    let activity = AtomicU64::new(0);
    let ab_count = AtomicU64::new(0);
    let ba_count = AtomicU64::new(0);
    let copy = async {
        let ab = one_way(a, b, &ab_count, &activity);
        let ba = one_way(b, a, &ba_count, &activity);
        let _ = tokio::join!(ab, ba);
    };
    let timed_out = match idle {
        None => {
            copy.await;
            false
        }
        Some(idle) => tokio::select! {
            _ = copy => false,
            _ = crate::tcp::idle_watch(&activity, idle) => true,
        },
    };
    (
        ab_count.load(Ordering::Relaxed),
        ba_count.load(Ordering::Relaxed),
        timed_out,
    )
}

/// Moves `r`'s bytes to `w` until `r` ends, then half-closes `w`.
async fn one_way(
    r: &TcpStream,
    w: &TcpStream,
    count: &AtomicU64,
    activity: &AtomicU64,
) -> io::Result<()> {
    // The buffer, while this direction holds one. Dropped (freed) with the future when the
    // relay ends early: an error, the idle timeout, or the task cancelled by a drain.
    let mut held: Option<Buffer> = None;
    loop {
        let (n, buf) = loop {
            r.readable().await?;
            let mut buf = held.take().unwrap_or_else(take_buffer);
            match r.try_read(&mut buf.0[..]) {
                Ok(n) => break (n, buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => give_back(buf),
                Err(e) => return Err(e),
            }
        };
        activity.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            give_back(buf);
            // Pass the end of stream on, but keep the other direction open.
            return socket2::SockRef::from(w).shutdown(Shutdown::Write);
        }
        let buf = held.insert(buf);
        let mut written = 0;
        while written < n {
            w.writable().await?;
            match w.try_write(&buf.0[written..n]) {
                Ok(k) => {
                    written += k;
                    count.fetch_add(k as u64, Ordering::Relaxed);
                    activity.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair of loopback TCP streams.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn spares() -> usize {
        SPARE.with(|s| s.borrow().len())
    }

    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let task = tokio::spawn(async move { relay(&a, &b, Some(Duration::from_secs(10))).await });
        // 3 MiB one way (many buffers' worth), then half-close.
        let payload: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == payload, "payload differs after relaying");
        let mut client = writer.await.unwrap();
        // The other direction still works after the half-close.
        server.write_all(b"world!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"world!");
        let (ab, ba, idle) = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((ab, ba, idle), (payload.len() as u64, 6, false));
    }

    /// A direction that waits gives its buffer back, so a paused connection holds none
    /// and the next reader reuses it; the spare list stays bounded.
    #[tokio::test]
    async fn waiting_directions_hold_no_buffer() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        // The relay runs on this test's thread (current-thread runtime), beside the spares.
        let relay = relay(&a, &b, None);
        tokio::pin!(relay);
        for round in 0..3u8 {
            client.write_all(&[round; 1000]).await.unwrap();
            let mut got = [0u8; 1000];
            tokio::select! {
                _ = &mut relay => panic!("the relay ended early"),
                r = tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut got)) => {
                    r.unwrap().unwrap();
                }
            }
            assert_eq!(got, [round; 1000]);
            // Let the relay try its next read, which would block.
            tokio::select! {
                _ = &mut relay => panic!("the relay ended early"),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            assert_eq!(spares(), 1, "round {round}: the buffer was not given back");
        }
        let many: Vec<_> = (0..2 * SPARE_MAX).map(|_| take_buffer()).collect();
        many.into_iter().for_each(give_back);
        assert_eq!(spares(), SPARE_MAX);
    }

    /// Past [`LARGE_MAX`] full-size buffers held at once (slow receivers), directions read
    /// through small ones; given back or dropped, full-size ones count no more. Other
    /// tests in this process hold a few of them now and then, hence the slack.
    #[test]
    fn the_memory_limit_counts_whole_buffers() {
        assert_eq!(buffers_for(DEFAULT_MEMORY_MIB), 256);
        assert_eq!(buffers_for(1), 4);
        assert_eq!(buffers_for(0), 0);
        assert_eq!(buffers_for(u64::MAX), usize::MAX / BUF_BYTES);
    }

    #[test]
    fn full_size_buffers_held_at_once_are_capped() {
        const LARGE_MAX: usize = buffers_for(DEFAULT_MEMORY_MIB);
        let mut held = Vec::new();
        let first_small = loop {
            let b = take_buffer();
            if b.0.len() == SMALL_BYTES {
                break held.len();
            }
            assert_eq!(b.0.len(), BUF_BYTES);
            held.push(b);
            assert!(held.len() <= LARGE_MAX, "no cap at {} buffers", held.len());
        };
        assert!(first_small + 16 >= LARGE_MAX, "capped at {first_small}");
        // Half given back (to the spares, at most SPARE_MAX kept), half dropped: either way
        // they stop counting, and full-size buffers come again.
        let half = held.split_off(held.len() / 2);
        held.into_iter().for_each(give_back);
        drop(half);
        assert!(LARGE_HELD.load(Ordering::Relaxed) < 16);
        assert_eq!(take_buffer().0.len(), BUF_BYTES);
    }

    #[tokio::test]
    async fn idle_relay_times_out() {
        let (_client, a) = pair().await;
        let (b, _server) = pair().await;
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            relay(&a, &b, Some(Duration::from_millis(200))),
        )
        .await
        .unwrap();
        assert_eq!(r, (0, 0, true));
    }
}
