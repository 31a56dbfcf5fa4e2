//! The lean HTTP/1.1 engine's codec: a reusable read buffer, one `httparse` pass over a
//! request or response head (kept as offsets, so no header is copied), the framing rules
//! (shared with the hyper engine through [`crate::hostile::body_framing`]), a strict chunked
//! validator that forwards chunked bodies as they are, and the head writers.
//!
//! Nothing here allocates per message once the buffers have grown to their working size.

use std::io;
use std::mem::MaybeUninit;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::hostile::{BodyFraming, body_framing};

/// Longest trailer section accepted in a chunked body.
const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// Most header lines parsed in one head (the configured limit is capped to it).
pub(crate) const MAX_HEADERS: usize = 128;

/// A read buffer: bytes `start..end` of `data` are unread. Reused for every message.
///
/// Nothing is allocated until the first read (which takes a spare buffer of an ended
/// connection when the thread has one). The memory is zero-filled once, when it is
/// allocated or grown, and never per read: reads go into initialised memory, which lets a
/// reader without access to uninitialised memory (safe code: [`crate::accept::LazyTcp`]
/// before its registration) read into it without filling it first. It starts at the size
/// given to [`Buf::new`] (most heads are well under 1 KiB), doubles when unread bytes fill
/// it (a long head, up to the caller's maximum), and doubles up to [`ADAPTIVE_MAX`] after a
/// read that filled all the free space (a body streaming through), so that a large body is
/// not moved in small reads.
#[derive(Debug)]
pub(crate) struct Buf {
    /// The memory, all of it initialised (its length is the buffer's size).
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// The size the next read makes room for.
    size: usize,
}

/// Largest size a buffer grows to because reads keep filling it (unread bytes that fill
/// it grow it further, up to the caller's maximum).
pub(crate) const ADAPTIVE_MAX: usize = 16 * 1024;

/// Most spare buffers kept per thread (each at most [`ADAPTIVE_MAX`] bytes).
const SPARE_MAX: usize = 64;

thread_local! {
    /// Memory of buffers whose connection ended, for the next connections: a buffer of a
    /// few KiB is beyond the allocator's per-thread cache, and its allocation, zero-fill
    /// and release were about a tenth of the instructions of a short connection.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A spare buffer's memory (initialised; its old bytes are not unread bytes of anyone),
/// if this thread has one.
fn take_spare() -> Option<Vec<u8>> {
    SPARE
        .try_with(|s| s.try_borrow_mut().ok()?.pop())
        .ok()
        .flatten()
}

impl Drop for Buf {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if data.is_empty() || data.len() > ADAPTIVE_MAX {
            return;
        }
        let _ = SPARE.try_with(|s| {
            if let Ok(mut spare) = s.try_borrow_mut() {
                if spare.len() < SPARE_MAX {
                    spare.push(data);
                }
            }
        });
    }
}

impl Buf {
    /// An empty buffer that will start with `size` bytes of room; nothing is allocated yet.
    pub(crate) fn new(size: usize) -> Buf {
        Buf {
            data: Vec::new(),
            start: 0,
            end: 0,
            size: size.max(64),
        }
    }

    /// The unread bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or(&[])
    }

    /// How many bytes are unread.
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether no byte is unread.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Marks `n` bytes as read.
    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Takes the unread bytes out (to hand them to another engine).
    pub(crate) fn take(&mut self) -> bytes::Bytes {
        let b = bytes::Bytes::copy_from_slice(self.bytes());
        self.consume(self.len());
        b
    }

    /// Reads once from `r` into the free space, growing the buffer up to `max` bytes when
    /// the unread bytes fill it. `Ok(0)` is the end of the stream; a full buffer is an error.
    pub(crate) async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        max: usize,
    ) -> io::Result<usize> {
        let room = self.make_room(max)?;
        let free = self
            .data
            .get_mut(self.end..self.end + room)
            .ok_or_else(|| io::Error::other("buffer out of range"))?;
        let n = r.read(free).await?;
        self.end += n.min(room);
        if n == room && self.size < ADAPTIVE_MAX.min(max) {
            self.size = (self.size * 2).min(ADAPTIVE_MAX.min(max));
        }
        Ok(n)
    }

    /// Makes free space after the unread bytes (moving them to the front, growing the
    /// buffer); how many bytes the next read may take.
    fn make_room(&mut self, max: usize) -> io::Result<usize> {
        let size = self.data.len();
        if self.start > 0 && (self.end == size || self.start >= size / 2) {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        if end >= max {
            return Err(io::Error::other("buffer full"));
        }
        if end >= self.size {
            self.size = (end * 2).max(4096);
        }
        let want = self.size.min(max);
        if self.data.is_empty() {
            if let Some(spare) = take_spare() {
                self.data = spare;
            }
        }
        if self.data.len() < want {
            self.data.reserve_exact(want - self.data.len());
            self.data.resize(want, 0);
        }
        Ok(self.data.len().min(max) - end)
    }
}

/// A span of a head: offset and length within the buffer the head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Span(u32, u32);

impl Span {
    fn of(base: &[u8], part: &[u8]) -> Span {
        let off = (part.as_ptr() as usize).saturating_sub(base.as_ptr() as usize);
        Span(off as u32, part.len() as u32)
    }

    /// The bytes of the span in `buf`.
    pub(crate) fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        let start = self.0 as usize;
        buf.get(start..start + self.1 as usize).unwrap_or(&[])
    }
}

/// A parsed request head, as offsets into the read buffer.
#[derive(Debug, Default)]
pub(crate) struct RequestHead {
    /// Length of the head in bytes.
    pub(crate) len: usize,
    pub(crate) method: Span,
    /// The request target in origin form (it starts with `/`): as sent, or the path and
    /// query of an absolute-form target.
    pub(crate) target: Span,
    /// The authority of an absolute-form target (`http://authority/path`, as clients send
    /// to a proxy; RFC 9112 §3.2.2), which routing takes as the request's host.
    pub(crate) authority: Option<Span>,
    /// Header lines (name, value).
    pub(crate) headers: Vec<(Span, Span)>,
    /// How the body is framed.
    pub(crate) framing: BodyFraming,
    /// `Connection: close` was asked for.
    pub(crate) close: bool,
    /// A `Connection` header names other headers (they are removed when forwarding).
    pub(crate) connection: bool,
}

/// What parsing a request head came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A head the lean engine handles.
    Complete,
    /// A head (or bytes) the lean engine leaves to the hyper engine: an upgrade, `Expect`,
    /// HTTP/1.0, a target in neither origin form nor [`absolute_http`]'s absolute form (or
    /// an absolute one without `Host`), or anything it cannot parse (hyper then answers it
    /// as it always did).
    Decline(&'static str),
    /// Ambiguous framing: answer `400` and close.
    Refuse(&'static str),
}

/// Whether a token list header value (`Connection`) holds `token`.
pub(crate) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

impl RequestHead {
    /// An empty head with room for `headers` header lines.
    pub(crate) fn with_capacity(headers: usize) -> RequestHead {
        RequestHead {
            headers: Vec::with_capacity(headers),
            ..RequestHead::default()
        }
    }

    /// Parses a request head at the start of `buf` (at most `max_headers` header lines).
    pub(crate) fn parse(&mut self, buf: &[u8], max_headers: usize) -> Parsed {
        // Uninitialised slots: filling 128 of them (4 KiB) on every parse was not free.
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let slots = &mut storage[..max_headers.clamp(1, MAX_HEADERS)];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, slots) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(httparse::Error::TooManyHeaders) => return Parsed::Decline("too-many-headers"),
            Err(_) => return Parsed::Decline("unparsable"),
        };
        if req.version != Some(1) {
            return Parsed::Decline("http/1.0");
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Parsed::Decline("unparsable");
        };
        if method == "CONNECT" {
            return Parsed::Decline("target-form");
        }
        let (authority, path) = if path.starts_with('/') {
            (None, path)
        } else if let Some((authority, path)) = absolute_http(path) {
            (Some(Span::of(buf, authority.as_bytes())), path)
        } else {
            return Parsed::Decline("target-form");
        };
        self.len = len;
        self.method = Span::of(buf, method.as_bytes());
        self.target = Span::of(buf, path.as_bytes());
        self.authority = authority;
        self.headers.clear();
        self.close = false;
        self.connection = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"upgrade") {
                return Parsed::Decline("upgrade");
            }
            if name.eq_ignore_ascii_case(b"expect") {
                return Parsed::Decline("expect");
            }
            if name.eq_ignore_ascii_case(b"connection") {
                self.connection = true;
                self.close |= has_token(h.value, b"close");
            }
            self.headers
                .push((Span::of(buf, name), Span::of(buf, h.value)));
        }
        match body_framing(req.headers.iter().map(|h| (h.name.as_bytes(), h.value))) {
            Ok(f) => self.framing = f,
            Err(why) => return Parsed::Refuse(why),
        }
        // The upstream gets the origin form and the client's `Host`, as from the hyper
        // engine, which makes one from the authority when there is none: left to it.
        if authority.is_some() && self.header(buf, "host").is_none() {
            return Parsed::Decline("absolute-form-without-host");
        }
        Parsed::Complete
    }

    /// The request's host as routing sees it: an absolute-form target's authority, else
    /// the `Host` header (as the hyper engine's `http::select`).
    pub(crate) fn host<'a>(&self, buf: &'a [u8]) -> Option<&'a str> {
        match self.authority {
            Some(a) => std::str::from_utf8(a.get(buf)).ok(),
            None => self.header(buf, "host"),
        }
    }

    /// The first value of header `name` (lower case) as text, like `HeaderValue::to_str`.
    pub(crate) fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a str> {
        let (_, v) = self
            .headers
            .iter()
            .find(|(n, _)| n.get(buf).eq_ignore_ascii_case(name.as_bytes()))?;
        visible_str(v.get(buf))
    }
}

/// An absolute-form request target with the `http` scheme, split into its authority and
/// its path and query (which start with `/`). `None` for anything else, which the hyper
/// engine keeps (and answers as it did): other schemes, an empty path (`http://host?q`),
/// and an authority that is not a plain [`host_and_port`] (user information, say).
fn absolute_http(target: &str) -> Option<(&str, &str)> {
    let scheme = target.get(..7)?;
    if !scheme.eq_ignore_ascii_case("http://") {
        return None;
    }
    let rest = &target[7..];
    let end = rest.find('/')?;
    let authority = &rest[..end];
    host_and_port(authority).then(|| (authority, &rest[end..]))
}

/// Whether `a` is a host name or IPv4 address (letters, digits, `-._~`), or an IPv6
/// literal in brackets, with an optional port (1 to 65535 as digits).
fn host_and_port(a: &str) -> bool {
    let (host, port) = match a.strip_prefix('[') {
        Some(rest) => {
            let Some((ip, after)) = rest.split_once(']') else {
                return false;
            };
            let port = match after {
                "" => None,
                p => match p.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return false,
                },
            };
            let ip_char = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
            (!ip.is_empty() && ip.bytes().all(ip_char), port)
        }
        None => {
            let (h, p) = match a.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (a, None),
            };
            let name_char = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
            (!h.is_empty() && h.bytes().all(name_char), p)
        }
    };
    host && port.is_none_or(|p| {
        p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0)
    })
}

/// A parsed request head with the buffer it points into, for the hashing policies.
pub(crate) struct HeadView<'b> {
    pub(crate) buf: &'b [u8],
    pub(crate) head: &'b RequestHead,
}

impl crate::balance::RequestHeaders for HeadView<'_> {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.head
            .headers
            .iter()
            .filter(move |(n, _)| n.get(self.buf).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.get(self.buf))
    }
}

/// `bytes` as text when it is visible ASCII (with spaces and tabs), as `HeaderValue::to_str`
/// requires.
pub(crate) fn visible_str(bytes: &[u8]) -> Option<&str> {
    if bytes
        .iter()
        .all(|b| *b == b'\t' || (0x20..0x7f).contains(b))
    {
        std::str::from_utf8(bytes).ok()
    } else {
        None
    }
}

/// How a response body is framed (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body (`HEAD`, 1xx, 204, 304).
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head, as offsets into the upstream read buffer.
#[derive(Debug, Default)]
pub(crate) struct ResponseHead {
    /// Length of the head in bytes.
    pub(crate) len: usize,
    /// The status code.
    pub(crate) status: u16,
    /// Header lines (name, value).
    pub(crate) headers: Vec<(Span, Span)>,
    /// The connection cannot carry another request after this response.
    pub(crate) close: bool,
    /// A `Connection` header names other headers.
    pub(crate) connection: bool,
}

/// Why a response head is unusable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadResponse;

impl ResponseHead {
    /// An empty head with room for `headers` header lines.
    pub(crate) fn with_capacity(headers: usize) -> ResponseHead {
        ResponseHead {
            headers: Vec::with_capacity(headers),
            ..ResponseHead::default()
        }
    }

    /// Parses a response head at the start of `buf`; `Ok(None)` when more bytes are needed.
    /// `head_request` says whether the request was `HEAD` (no body then).
    pub(crate) fn parse(
        &mut self,
        buf: &[u8],
        head_request: bool,
    ) -> Result<Option<ResponseFraming>, BadResponse> {
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut storage,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(BadResponse),
        };
        let status = resp.code.ok_or(BadResponse)?;
        // httparse takes any three digits; a status is 100 to 999 (as `http::StatusCode`,
        // so both engines turn the same upstream answers into 502s).
        if !(100..=999).contains(&status) {
            return Err(BadResponse);
        }
        self.len = len;
        self.status = status;
        self.headers.clear();
        self.close = resp.version != Some(1);
        self.connection = false;
        let mut te = None::<bool>;
        let mut length = None;
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"connection") {
                self.connection = true;
                self.close |= has_token(h.value, b"close");
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Chunked must be the final coding; anything else is read until close.
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(&[]);
                te = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name.eq_ignore_ascii_case(b"content-length") {
                for part in h.value.split(|b| *b == b',') {
                    let n = parse_decimal(part.trim_ascii()).ok_or(BadResponse)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(BadResponse);
                    }
                    length = Some(n);
                }
            }
            self.headers
                .push((Span::of(buf, name), Span::of(buf, h.value)));
        }
        let framing = if head_request || (100..200).contains(&status) || matches!(status, 204 | 304)
        {
            ResponseFraming::None
        } else {
            match (te, length) {
                // Both: chunked wins, and the connection is not reused (RFC 9112 §6.3).
                (Some(true), l) => {
                    self.close |= l.is_some();
                    ResponseFraming::Chunked
                }
                (Some(false), _) => ResponseFraming::Close,
                (None, Some(n)) => ResponseFraming::Length(n),
                (None, None) => ResponseFraming::Close,
            }
        };
        if framing == ResponseFraming::Close {
            self.close = true;
        }
        Ok(Some(framing))
    }
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// A chunked body that is not valid (RFC 9112 §7.1).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadChunk;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk size: its value and digit count.
    Size(u64, u8),
    /// Whitespace after the size.
    SizeSpace(u64),
    /// A chunk extension, up to CR.
    Ext(u64),
    /// Expecting LF after the size line.
    SizeLf(u64),
    /// Chunk data left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Follows a chunked body byte by byte (data in bulk) so that it can be forwarded exactly
/// as it came, and refuses anything ambiguous: sizes that are not hex or overflow, bare
/// LF line ends, data longer than its size, control bytes in extensions and trailers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunked {
    state: Chunk,
    trailer_bytes: usize,
    /// Payload bytes (chunk data, not framing) consumed since [`BodyState::payload`] last
    /// took them.
    data: u64,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: Chunk::Size(0, 0),
            trailer_bytes: 0,
            data: 0,
        }
    }
}

impl Chunked {
    /// Consumes the start of `data`: how many bytes belong to the body, and whether the
    /// body ended with them.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), BadChunk> {
        let mut i = 0;
        while i < data.len() {
            if self.state == Chunk::Done {
                return Ok((i, true));
            }
            if let Chunk::Data(n) = self.state {
                let take = (data.len() - i).min(usize::try_from(n).unwrap_or(usize::MAX));
                i += take;
                self.data += take as u64;
                let left = n - take as u64;
                self.state = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left)
                };
                continue;
            }
            self.state = self.byte(data[i])?;
            i += 1;
        }
        Ok((i, self.state == Chunk::Done))
    }

    fn byte(&mut self, b: u8) -> Result<Chunk, BadChunk> {
        Ok(match (self.state, b) {
            (Chunk::Size(size, digits), _) if b.is_ascii_hexdigit() => {
                if digits >= 16 {
                    return Err(BadChunk);
                }
                let d = (b as char).to_digit(16).ok_or(BadChunk)?;
                Chunk::Size(size << 4 | u64::from(d), digits + 1)
            }
            (Chunk::Size(size, d), b' ' | b'\t') if d > 0 => Chunk::SizeSpace(size),
            (Chunk::SizeSpace(size), b' ' | b'\t') => Chunk::SizeSpace(size),
            (Chunk::Size(size, d), b';') if d > 0 => Chunk::Ext(size),
            (Chunk::SizeSpace(size), b';') => Chunk::Ext(size),
            (Chunk::Size(size, d), b'\r') if d > 0 => Chunk::SizeLf(size),
            (Chunk::SizeSpace(size) | Chunk::Ext(size), b'\r') => Chunk::SizeLf(size),
            (Chunk::Ext(size), _) if b == b'\t' || !b.is_ascii_control() => Chunk::Ext(size),
            (Chunk::SizeLf(0), b'\n') => Chunk::TrailerStart,
            (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Size(0, 0),
            (Chunk::TrailerStart, b'\r') => Chunk::EndLf,
            (Chunk::TrailerStart | Chunk::TrailerLine, _)
                if b == b'\t' || !b.is_ascii_control() =>
            {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_TRAILER_BYTES {
                    return Err(BadChunk);
                }
                Chunk::TrailerLine
            }
            (Chunk::TrailerLine, b'\r') => Chunk::TrailerLf,
            (Chunk::TrailerLf, b'\n') => Chunk::TrailerStart,
            (Chunk::EndLf, b'\n') => Chunk::Done,
            _ => return Err(BadChunk),
        })
    }
}

/// Where a body is in its framing, for forwarding it piece by piece.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BodyState {
    /// This many bytes are left.
    Length(u64),
    /// A chunked body.
    Chunked(Chunked),
    /// Until the end of the stream.
    Close,
}

impl BodyState {
    /// How many of the bytes in `data` belong to the body, and whether it ended with them.
    pub(crate) fn step(&mut self, data: &[u8]) -> Result<(usize, bool), BadChunk> {
        match self {
            BodyState::Length(n) => {
                let take = data.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                *n -= take as u64;
                Ok((take, *n == 0))
            }
            BodyState::Chunked(c) => c.feed(data),
            BodyState::Close => Ok((data.len(), false)),
        }
    }

    /// The payload in the last `wire` bytes [`BodyState::step`] took (for a chunked body,
    /// its data since the last call, without the chunk framing).
    pub(crate) fn payload(&mut self, wire: usize) -> u64 {
        match self {
            BodyState::Chunked(c) => std::mem::take(&mut c.data),
            BodyState::Length(_) | BodyState::Close => wire as u64,
        }
    }
}

/// Whether a header name is hop-by-hop ([`crate::http::HOP_BY_HOP`]; `te` is handled apart).
pub(crate) fn is_hop_by_hop(name: &[u8]) -> bool {
    crate::http::HOP_BY_HOP
        .iter()
        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
}

/// Appends the header line `name: value` of a head in `buf`, the name in lower case, as
/// [`put_header`] does; a line that already reads exactly `name: value` CRLF in `buf` (the
/// usual case) is copied in one piece.
pub(crate) fn put_line(out: &mut Vec<u8>, buf: &[u8], name: Span, value: Span) {
    let (start, name_len) = (name.0 as usize, name.1 as usize);
    let end = value.0 as usize + value.1 as usize + 2;
    let line = buf.get(start..end).filter(|line| {
        value.0 as usize == start + name_len + 2
            && line.get(name_len..name_len + 2) == Some(b": ")
            && line.ends_with(b"\r\n")
    });
    match line {
        Some(line) => {
            let at = out.len();
            out.extend_from_slice(line);
            if let Some(copied) = out.get_mut(at..at + name_len) {
                copied.make_ascii_lowercase();
            }
        }
        None => put_header(out, name.get(buf), value.get(buf)),
    }
}

/// Appends a header line, the name in lower case (as the hyper engine sends it).
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    let at = out.len();
    // Copied whole and lowered in place: byte by byte through an iterator cost several
    // times more (a capacity check per byte).
    out.extend_from_slice(name);
    if let Some(copied) = out.get_mut(at..) {
        copied.make_ascii_lowercase();
    }
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `Date` header for now (RFC 9110 §6.6.1: a proxy adds one to a response that
/// has none, as the hyper engine does), formatted at most once a second per thread.
pub(crate) fn put_date(out: &mut Vec<u8>) {
    with_date(|v| put_header(out, b"date", v.as_bytes()));
}

/// The `Date` header's value now (RFC 9110 §6.6.1).
pub(crate) fn date() -> http::HeaderValue {
    with_date(http::HeaderValue::clone)
}

/// Calls `f` with the `Date` value now, formatted once per second per thread.
fn with_date<R>(f: impl FnOnce(&http::HeaderValue) -> R) -> R {
    thread_local! {
        static CACHE: std::cell::RefCell<(u64, http::HeaderValue)> =
            const { std::cell::RefCell::new((0, http::HeaderValue::from_static(""))) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            // An HTTP date is visible ASCII: always a valid value.
            if let Ok(v) = http::HeaderValue::try_from(httpdate::fmt_http_date(now)) {
                *c = (secs, v);
            }
        }
        f(&c.1)
    })
}

/// Appends a decimal number.
pub(crate) fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Whether a header of `headers` (in `buf`) is `Connection` and names `name`.
pub(crate) fn named_by_connection(buf: &[u8], headers: &[(Span, Span)], name: &[u8]) -> bool {
    headers
        .iter()
        .any(|(n, v)| n.get(buf).eq_ignore_ascii_case(b"connection") && has_token(v.get(buf), name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> (Parsed, RequestHead) {
        let mut h = RequestHead::default();
        let p = h.parse(bytes, 100);
        (p, h)
    }

    const GET: &[u8] =
        b"GET /a?b=1 HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nConnection: keep-alive, x-a\r\n\r\n";

    #[tokio::test]
    async fn buffers_allocate_on_first_read_and_grow_to_what_is_needed() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = &src[..];
        // No spare buffer of an earlier test on this thread.
        SPARE.with(|s| s.borrow_mut().clear());
        let mut b = Buf::new(4096);
        assert_eq!(b.data.capacity(), 0, "nothing allocated before a read");
        assert_eq!(b.fill(&mut r, 1 << 20).await.unwrap(), 4096);
        // Reads that fill the free space double it, up to ADAPTIVE_MAX.
        let mut reads = Vec::new();
        for _ in 0..4 {
            b.consume(b.len());
            reads.push(b.fill(&mut r, 1 << 20).await.unwrap());
        }
        assert_eq!(reads, [8192, ADAPTIVE_MAX, ADAPTIVE_MAX, ADAPTIVE_MAX]);
        assert_eq!(b.data.capacity(), ADAPTIVE_MAX);
        let read = 4096 + 8192 + 3 * ADAPTIVE_MAX;
        assert_eq!(b.bytes(), &src[read - ADAPTIVE_MAX..read]);

        // Unread bytes are kept in order across partial consumes and moves to the front.
        b.consume(ADAPTIVE_MAX - 10);
        let got = b.fill(&mut r, 1 << 20).await.unwrap();
        assert_eq!(b.bytes(), &src[read - 10..read + got]);
    }

    #[tokio::test]
    async fn an_ended_connections_buffer_serves_the_next_one_empty() {
        let mut r: &[u8] = b"secret bytes of the first connection";
        let mut first = Buf::new(4096);
        first.fill(&mut r, 1 << 20).await.unwrap();
        let ptr = first.data.as_ptr();
        drop(first);
        let mut r: &[u8] = b"next";
        let mut next = Buf::new(4096);
        assert_eq!(next.data.capacity(), 0, "taken on the first read only");
        next.fill(&mut r, 1 << 20).await.unwrap();
        assert_eq!(next.data.as_ptr(), ptr, "the spare memory was not reused");
        assert_eq!(next.bytes(), b"next");
        // A buffer grown past ADAPTIVE_MAX is not kept.
        let big = vec![7u8; 100_000];
        let mut r = &big[..];
        let mut grown = Buf::new(4096);
        while grown.len() < 40_000 {
            grown.fill(&mut r, 1 << 20).await.unwrap();
        }
        drop(grown);
        let spare = SPARE.with(|s| s.borrow().iter().map(Vec::capacity).max());
        assert!(spare.is_none_or(|c| c <= ADAPTIVE_MAX), "{spare:?}");
    }

    #[tokio::test]
    async fn unread_bytes_grow_a_buffer_up_to_its_maximum_only() {
        let src = vec![b'x'; 100_000];
        let mut r = &src[..];
        SPARE.with(|s| s.borrow_mut().clear());
        let mut b = Buf::new(4096);
        let mut total = 0;
        let err = loop {
            match b.fill(&mut r, 10_000).await {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.to_string(), "buffer full");
        assert_eq!((total, b.len()), (10_000, 10_000));
        assert!(b.data.capacity() <= 16_384);
    }

    #[test]
    fn header_lines_lower_the_name_only() {
        let mut out = b"GET / HTTP/1.1\r\n".to_vec();
        put_header(&mut out, b"X-Mixed-Case", b"Value Kept AS-IS");
        put_header(&mut out, b"host", b"Svc");
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nx-mixed-case: Value Kept AS-IS\r\nhost: Svc\r\n"
        );
    }

    #[test]
    fn header_lines_from_a_head_come_out_the_same_whether_copied_or_rebuilt() {
        let raw = b"GET / HTTP/1.1\r\nHost: Svc\r\nX-Tight:v\r\nX-Wide:  a b  \r\nX-Lf: c\nX-Empty: \r\nX-Last: z\r\n\r\n";
        let (p, head) = parse(raw);
        assert_eq!(p, Parsed::Complete);
        let (mut copied, mut rebuilt) = (Vec::new(), Vec::new());
        for (n, v) in &head.headers {
            put_line(&mut copied, raw, *n, *v);
            put_header(&mut rebuilt, n.get(raw), v.get(raw));
        }
        assert_eq!(
            String::from_utf8(copied).unwrap(),
            String::from_utf8(rebuilt).unwrap()
        );
    }

    #[test]
    fn hash_keys_from_the_head_match_those_from_a_header_map() {
        use crate::balance::request_hash;
        use sidemesh_api::config::HashOn;
        let raw = b"GET / HTTP/1.1\r\nHost: svc\r\nX-User: alice\r\nCookie: a=1\r\nCookie: session=xyz; b=2\r\n\r\n";
        let (p, head) = parse(raw);
        assert_eq!(p, Parsed::Complete);
        let view = HeadView {
            buf: raw,
            head: &head,
        };
        let mut map = http::HeaderMap::new();
        map.insert("x-user", http::HeaderValue::from_static("alice"));
        map.append("cookie", http::HeaderValue::from_static("a=1"));
        map.append("cookie", http::HeaderValue::from_static("session=xyz; b=2"));
        let peer = "10.1.1.1:5000".parse().unwrap();
        for on in [
            HashOn::Header("x-user".into()),
            HashOn::Cookie("session".into()),
            HashOn::Cookie("absent".into()),
            HashOn::Header("absent".into()),
        ] {
            let from_head = request_hash(Some(&on), &view, peer);
            assert_eq!(from_head, request_hash(Some(&on), &map, peer), "{on:?}");
            assert_eq!(from_head.is_some(), !format!("{on:?}").contains("absent"));
        }
    }

    #[test]
    fn a_head_split_at_every_byte_is_partial_until_its_end() {
        for cut in 0..GET.len() {
            assert_eq!(parse(&GET[..cut]).0, Parsed::Partial, "cut at {cut}");
        }
        let (p, h) = parse(GET);
        assert_eq!(p, Parsed::Complete);
        assert_eq!(h.len, GET.len());
        assert_eq!(h.method.get(GET), b"GET");
        assert_eq!(h.target.get(GET), b"/a?b=1");
        assert_eq!(h.header(GET, "host"), Some("svc"));
        assert!(h.connection && !h.close);
        assert!(named_by_connection(GET, &h.headers, b"X-A"));
        assert_eq!(h.framing, BodyFraming::None);
    }

    #[test]
    fn absolute_form_targets_are_taken_with_their_authority() {
        let raw = b"GET http://api.shop:8080/a?b=1 HTTP/1.1\r\nHost: other\r\n\r\n";
        let (p, h) = parse(raw);
        assert_eq!(p, Parsed::Complete);
        assert_eq!(h.target.get(raw), b"/a?b=1");
        assert_eq!(h.authority.map(|a| a.get(raw)), Some(&b"api.shop:8080"[..]));
        assert_eq!(h.host(raw), Some("api.shop:8080"));
        let raw = b"GET HTTP://[::1]:80/ HTTP/1.1\r\nHost: x\r\n\r\n";
        let (p, h) = parse(raw);
        assert_eq!(p, Parsed::Complete);
        assert_eq!(
            (h.target.get(raw), h.host(raw)),
            (&b"/"[..], Some("[::1]:80"))
        );
        for ok in [
            "10.0.0.1",
            "a-b.c_d~e",
            "x:1",
            "x:65535",
            "[::ffff:10.0.0.1]",
        ] {
            assert!(host_and_port(ok), "{ok}");
        }
        // Origin form: no authority, the host is `Host`'s.
        let (p, h) = parse(GET);
        assert_eq!(
            (p, h.authority, h.host(GET)),
            (Parsed::Complete, None, Some("svc"))
        );
    }

    #[test]
    fn pipelined_heads_parse_one_after_another() {
        let two = [
            GET,
            b"POST /b HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        ]
        .concat();
        let (p, h) = parse(&two);
        assert_eq!(p, Parsed::Complete);
        let rest = &two[h.len..];
        let (p, h2) = parse(rest);
        assert_eq!(p, Parsed::Complete);
        assert_eq!(h2.framing, BodyFraming::Length(2));
        assert!(h2.close);
        assert_eq!(&rest[h2.len..], b"hi");
    }

    #[test]
    fn smuggling_cases_are_refused_from_the_one_parse() {
        let cases: [(&[u8], &str); 8] = [
            (b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", "content-length-with-transfer-encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n", "content-length-with-transfer-encoding"),
            (b"POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\nCONTENT-LENGTH: 0\r\n\r\n", "content-length-with-transfer-encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n", "unsupported-transfer-encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported-transfer-encoding"),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "unsupported-transfer-encoding"),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\n", "conflicting-content-length"),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", "bad-content-length"),
        ];
        for (bytes, why) in cases {
            assert_eq!(
                parse(bytes).0,
                Parsed::Refuse(why),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 3, 30\r\n\r\n").0,
            Parsed::Refuse("conflicting-content-length")
        );
        let (p, h) = parse(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((p, h.framing), (Parsed::Complete, BodyFraming::Length(3)));
    }

    #[test]
    fn bad_bytes_and_unusual_heads_go_to_the_hyper_engine() {
        let cases: [&[u8]; 24] = [
            b"GET / HTTP/1.1\r\nX-A: a\0b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX\0A: a\r\n\r\n",
            b"GET /a\r\nb HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET https://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http:///a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://u@x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x:/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x:y/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://a:1:2/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x:65536/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x:+80/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://[::1/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://[zz]/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET http://[::1]x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ];
        for bytes in cases {
            assert!(
                matches!(parse(bytes).0, Parsed::Decline(_)),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn too_many_headers_is_declined_and_bare_lf_is_accepted() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).0, Parsed::Decline("too-many-headers"));
        let (p, h) = parse(b"GET /lf HTTP/1.1\nHost: x\n\n");
        assert_eq!(p, Parsed::Complete);
        assert_eq!(
            h.header(b"GET /lf HTTP/1.1\nHost: x\n\n", "host"),
            Some("x")
        );
    }

    fn feed_all(body: &[u8], step: usize) -> Result<(usize, bool), BadChunk> {
        let mut c = Chunked::default();
        let mut used = 0;
        for piece in body.chunks(step) {
            let (n, done) = c.feed(piece)?;
            used += n;
            if done {
                return Ok((used, true));
            }
        }
        Ok((used, false))
    }

    #[test]
    fn chunked_with_extensions_and_trailers_at_every_split() {
        let body = b"5;name=\"v\"\r\nhello\r\n3 ; x\r\nabc\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\nGET /next";
        let end = body.len() - b"GET /next".len();
        for step in 1..body.len() {
            assert_eq!(feed_all(body, step), Ok((end, true)), "step {step}");
        }
    }

    #[test]
    fn bad_chunks_are_refused() {
        let cases: [&[u8]; 7] = [
            b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"3\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\nX: a\0\r\n\r\n",
        ];
        for body in cases {
            assert_eq!(
                feed_all(body, 1),
                Err(BadChunk),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(feed_all(body, body.len()), Err(BadChunk));
        }
    }

    #[test]
    fn response_framing() {
        let mut h = ResponseHead::default();
        let r = |h: &mut ResponseHead, s: &[u8], head: bool| h.parse(s, head);
        assert_eq!(
            r(
                &mut h,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                false
            ),
            Ok(Some(ResponseFraming::Length(2)))
        );
        assert!(!h.close);
        assert_eq!(
            r(
                &mut h,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
                true
            ),
            Ok(Some(ResponseFraming::None))
        );
        for s in [204, 304] {
            let head = format!("HTTP/1.1 {s} X\r\nContent-Length: 5\r\n\r\n");
            assert_eq!(
                r(&mut h, head.as_bytes(), false),
                Ok(Some(ResponseFraming::None))
            );
        }
        assert_eq!(
            r(&mut h, b"HTTP/1.1 200 OK\r\n\r\nabc", false),
            Ok(Some(ResponseFraming::Close))
        );
        assert!(h.close);
        assert_eq!(
            r(
                &mut h,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false
            ),
            Ok(Some(ResponseFraming::Chunked))
        );
        assert!(h.close);
        assert_eq!(
            r(
                &mut h,
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
                false
            ),
            Err(BadResponse)
        );
        assert_eq!(r(&mut h, b"HTTP/1.1 200 OK\r\nContent-", false), Ok(None));
        assert_eq!(
            r(
                &mut h,
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            ),
            Ok(Some(ResponseFraming::Length(0)))
        );
        assert!(h.close);
    }

    #[test]
    fn length_bodies_end_at_their_length() {
        let mut s = BodyState::Length(5);
        assert_eq!(s.step(b"hel"), Ok((3, false)));
        assert_eq!(s.step(b"loGET"), Ok((2, true)));
    }

    /// A bounded random loop: the codec never panics on arbitrary bytes, and whatever it
    /// accepts has spans inside the input.
    #[test]
    fn never_panics_on_random_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let alphabet: &[u8] = b"GETPOST /HTTP1.\r\n:;,0123456789abcdefxX-chunkedContent-LengthTransfer-Encoding \t\0\x7f\xff";
        for round in 0..20_000 {
            let len = rng.random_range(0..200);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if round % 2 == 0 {
                        alphabet[rng.random_range(0..alphabet.len())]
                    } else {
                        rng.random()
                    }
                })
                .collect();
            let mut h = RequestHead::default();
            if h.parse(&bytes, 100) == Parsed::Complete {
                assert!(h.len <= bytes.len());
                for (n, v) in &h.headers {
                    assert!(!n.get(&bytes).is_empty() || v.get(&bytes).is_empty());
                }
            }
            let mut r = ResponseHead::default();
            let _ = r.parse(&bytes, round % 3 == 0);
            let mut c = Chunked::default();
            if let Ok((n, _)) = c.feed(&bytes) {
                assert!(n <= bytes.len());
            }
        }
    }
}
