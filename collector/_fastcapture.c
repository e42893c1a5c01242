/* collector._fastcapture: capture records walked, peeled and batched in C, for `ingest`.
 *
 * One `Walker` reads one capture file held in memory (an mmap, or any C-contiguous buffer)
 * and does, record after record, what the pure-Python path of collector/ingest.py does with
 * collector/capture.py (the reader), collector/decode/outer.py (outer link layer, IPv4/IPv6,
 * UDP) and ingest's `_route` / `_Slots.add` (receive slots per mirror port):
 *
 *   - classic pcap, both byte orders, micro- or nanosecond timestamps, link type = low 16 bits;
 *   - pcapng: sections of either byte order, interfaces with their link type, snaplen,
 *     if_tsresol and if_tsoffset; Enhanced, Simple and obsolete Packet Blocks; every other
 *     block skipped by its length;
 *   - each record's timestamp advances the capture clock; every TICK_NS of it the walker stops
 *     so that Python feeds what is batched and expires flows (as ingest does);
 *   - a UDP 4789/4790/6081 datagram goes, payload first bytes and its lengths, into the slots of
 *     its port; any other frame whose link layer parses becomes a VXLAN datagram of its own (the
 *     8-byte header Python gives, the frame rewritten to Ethernet); the rest is `skipped`.
 *
 * The readable reference is the Python code; every rule here has its twin there, and
 * tests/test_fastcapture.py checks that the two produce the same batches, counters and errors
 * on generated, mutated and real captures. Errors carry the same (offset, message) that
 * CaptureError would: the messages are built here with the same wording.
 *
 * The walker never reads outside the buffer: every read is bounded by the bytes present, and
 * lengths are checked (absurd caplen, block length) before they are used. A mapped file that
 * another process truncates while it is walked loses its pages past the new end: reading them
 * raises SIGBUS, which the walk catches (on_sigbus) and reports as a cut record.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#define MAX_CAPLEN 262144u           /* capture.MAX_CAPLEN */
#define MAX_BLOCK_LEN (16u << 20)     /* capture.MAX_BLOCK_LEN */
#define NS_PER_S 1000000000LL
#define TICK_NS 1000000000LL          /* ingest.TICK_NS */
#define PORTS 3                       /* slot groups: 4789, 4790, 6081, in that order */

#define SHB 0x0A0D0D0Au
#define IDB 1u
#define PB 2u
#define SPB 3u
#define EPB 6u

enum { ST_DONE = 0, ST_FULL = 1, ST_TICK = 2, ST_ERROR = 3, ST_PAUSE = 4 };
enum { FMT_HEADER = 0, FMT_PCAP = 1, FMT_PCAPNG = 2 };

typedef struct {
    uint16_t linktype;
    uint32_t snaplen;
    int ts_base;       /* 10 or 2: if_tsresol */
    int ts_exponent;   /* ticks per second = ts_base ** ts_exponent */
    __int128 offset_ns; /* if_tsoffset, in nanoseconds */
} Interface;

typedef struct {
    Py_buffer buf, lengths, present, ts, no_vni;
    int held;  /* how many of the views above are held (released in that order) */
} Slab;

typedef struct {
    PyObject_HEAD
    Py_buffer data;
    int data_held;
    Slab slabs[PORTS];
    Py_ssize_t batch_rows, width;
    long long rows[PORTS];
    unsigned char vxlan_header[8];
    int no_vni;
    /* the file */
    int format;
    int swap;           /* pcap file / pcapng section in the other byte order than ours */
    int nano;           /* pcap: nanosecond timestamps */
    uint16_t pcap_linktype;
    Interface *ifaces;
    Py_ssize_t n_ifaces, cap_ifaces;
    Py_ssize_t pos;     /* offset of the next record/block */
    long long index;    /* records so far (Record.index of the next one) */
    /* the capture clock (ingest's `clock` and `next_tick`) */
    long long clock;
    long long tick_base;  /* next_tick = tick_base + TICK_NS */
    int ticking;          /* next_tick is set */
    /* counters (IngestResult) */
    long long records, mirror_datagrams, plain_packets, skipped;
    /* the last stop */
    int full_port;
    int busy;  /* run() is walking with the GIL released: close() must wait */
    int failed;
    Py_ssize_t error_offset;
    char error[320];
    /* the counters when the record at `pos` began: a SIGBUS in the middle of it undoes it */
    long long mark[4];
} Walker;

/* -- a file truncated while mapped ------------------------------------------------------------- */

/* While a walk runs in a thread, SIGBUS (a read of a mapped page past the file's end, since
 * another process truncated it) jumps back to that walk instead of ending the process. The
 * handler is installed for the walks' duration only; a SIGBUS that is not a walk's goes to the
 * handler installed before (or kills the process as it would have). */
static __thread sigjmp_buf *bus_jump;
static __thread uintptr_t bus_address;
static struct sigaction bus_previous;
static int bus_walks;
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    if (bus_jump != NULL) {
        bus_address = (uintptr_t)info->si_addr;
        siglongjmp(*bus_jump, 1);
    }
    if (bus_previous.sa_flags & SA_SIGINFO) {
        bus_previous.sa_sigaction(sig, info, context);
    } else if (bus_previous.sa_handler == SIG_DFL || bus_previous.sa_handler == SIG_IGN) {
        signal(SIGBUS, SIG_DFL); /* the fault repeats on return, and ends the process */
    } else {
        bus_previous.sa_handler(sig);
    }
}

static void bus_catch(void) {
    pthread_mutex_lock(&bus_lock);
    if (bus_walks++ == 0) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = on_sigbus;
        action.sa_flags = SA_SIGINFO;
        sigemptyset(&action.sa_mask);
        sigaction(SIGBUS, &action, &bus_previous);
    }
    pthread_mutex_unlock(&bus_lock);
}

static void bus_release(void) {
    pthread_mutex_lock(&bus_lock);
    if (--bus_walks == 0) sigaction(SIGBUS, &bus_previous, NULL);
    pthread_mutex_unlock(&bus_lock);
}

static inline void mark_record(Walker *w, Py_ssize_t pos) {
    w->pos = pos;
    w->mark[0] = w->records;
    w->mark[1] = w->mirror_datagrams;
    w->mark[2] = w->plain_packets;
    w->mark[3] = w->skipped;
}

/* -- byte access ------------------------------------------------------------------------------ */

static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static inline uint32_t rd32(const unsigned char *p, int swap) {
    uint32_t v;
    memcpy(&v, p, 4);
    return swap ? __builtin_bswap32(v) : v;
}

static inline uint16_t rd16(const unsigned char *p, int swap) {
    uint16_t v;
    memcpy(&v, p, 2);
    return swap ? __builtin_bswap16(v) : v;
}

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the walker assumes a little-endian host (x86-64, arm64)"
#endif

static int fail(Walker *w, Py_ssize_t offset, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(Walker *w, Py_ssize_t offset, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(w->error, sizeof w->error, fmt, args);
    va_end(args);
    w->error_offset = offset;
    w->failed = 1;
    return ST_ERROR;
}

/* -- outer headers: collector/decode/outer.py -------------------------------------------------- */

#define ETH_IPV4 0x0800
#define ETH_IPV6 0x86DD

static inline int is_vlan_tpid(unsigned t) { return t == 0x8100 || t == 0x88A8 || t == 0x9100; }

/* _after_tags: 1 with (*ethertype, *at) set, 0 when a tag is cut */
static inline int after_tags(const unsigned char *d, Py_ssize_t n, unsigned *ethertype,
                             Py_ssize_t *at) {
    while (is_vlan_tpid(*ethertype)) {
        if (*at + 4 > n) return 0;
        *ethertype = be16(d + *at + 2);
        *at += 4;
    }
    return 1;
}

static inline int loopback_family(uint32_t family, unsigned *ethertype) {
    switch (family) {
    case 2: *ethertype = ETH_IPV4; return 1;
    case 24: case 28: case 30: *ethertype = ETH_IPV6; return 1;
    default: return 0;
    }
}

/* link_layer(linktype, data): 1 with (ethertype, offset of the network header), else 0 */
static int link_layer(unsigned linktype, const unsigned char *d, Py_ssize_t n, unsigned *ethertype,
                      Py_ssize_t *at) {
    switch (linktype) {
    case 1: /* Ethernet */
        if (n < 14) return 0;
        *ethertype = be16(d + 12);
        *at = 14;
        return after_tags(d, n, ethertype, at);
    case 113: /* Linux SLL: packet type, ARPHRD, address length, address (8), protocol */
        if (n < 16) return 0;
        *ethertype = be16(d + 14);
        *at = 16;
        return after_tags(d, n, ethertype, at);
    case 276: /* Linux SLL2: protocol first */
        if (n < 20) return 0;
        *ethertype = be16(d);
        *at = 20;
        return after_tags(d, n, ethertype, at);
    case 0: { /* BSD loopback: the family in the capturing host's byte order */
        if (n < 4) return 0;
        uint32_t le, be;
        memcpy(&le, d, 4);
        be = __builtin_bswap32(le);
        *at = 4;
        return loopback_family(le, ethertype) || loopback_family(be, ethertype);
    }
    case 108: { /* OpenBSD loopback: network order */
        if (n < 4) return 0;
        uint32_t le;
        memcpy(&le, d, 4);
        *at = 4;
        return loopback_family(__builtin_bswap32(le), ethertype);
    }
    case 12: case 14: case 101: { /* raw IP: the version nibble says which */
        unsigned version = n ? d[0] >> 4 : 0;
        *at = 0;
        if (version == 4) { *ethertype = ETH_IPV4; return 1; }
        if (version == 6) { *ethertype = ETH_IPV6; return 1; }
        return 0;
    }
    case 228: *ethertype = ETH_IPV4; *at = 0; return 1;
    case 229: *ethertype = ETH_IPV6; *at = 0; return 1;
    default: return 0;
    }
}

typedef struct {
    int port_index;
    Py_ssize_t start, end;  /* the payload bytes the capture holds */
    long long payload_len;  /* the datagram's payload length */
} Outer;

static inline int mirror_port_index(unsigned port) {
    return port == 4789 ? 0 : port == 4790 ? 1 : port == 6081 ? 2 : -1;
}

/* _udp: `ip_end` < 0 when the IP header does not say where the packet ends */
static int udp(const unsigned char *d, Py_ssize_t n, Py_ssize_t at, Py_ssize_t ip_end, Outer *o) {
    if (at + 8 > n || (ip_end >= 0 && at + 8 > ip_end)) return 0;
    int index = mirror_port_index(be16(d + at + 2));
    if (index < 0) return 0;
    unsigned udp_len = be16(d + at + 4);
    Py_ssize_t start = at + 8;
    long long payload_len;
    if (udp_len >= 8)
        payload_len = udp_len - 8;
    else if (udp_len == 0) /* RFC 2675 jumbogram: the IP layer has the length, if anything does */
        payload_len = (ip_end < 0 ? n : ip_end) - start;
    else
        return 0;
    Py_ssize_t end = start + payload_len < n ? start + (Py_ssize_t)payload_len : n;
    if (ip_end >= 0 && ip_end < end) end = ip_end;
    o->port_index = index;
    o->start = start;
    o->end = end;
    o->payload_len = payload_len;
    return 1;
}

static int outer_ipv4(const unsigned char *d, Py_ssize_t n, Py_ssize_t l3, Outer *o) {
    if (n - l3 < 20 || d[l3] >> 4 != 4 || d[l3 + 9] != 17) return 0;
    Py_ssize_t header_len = (d[l3] & 0x0F) * 4;
    unsigned total_len = be16(d + l3 + 2);
    if (header_len < 20 || (be16(d + l3 + 6) & 0x1FFF)) return 0; /* non-first fragment */
    Py_ssize_t ip_end;
    if (total_len == 0)
        ip_end = -1; /* TSO: the length was left for the NIC to fill in */
    else if (total_len < header_len + 8)
        return 0;
    else
        ip_end = l3 + total_len;
    return udp(d, n, l3 + header_len, ip_end, o);
}

static int outer_ipv6(const unsigned char *d, Py_ssize_t n, Py_ssize_t l3, Outer *o) {
    if (n - l3 < 40 || d[l3] >> 4 != 6) return 0;
    unsigned payload_len = be16(d + l3 + 4);
    Py_ssize_t ip_end = payload_len ? l3 + 40 + payload_len : -1; /* 0: a jumbogram */
    unsigned next_header = d[l3 + 6];
    Py_ssize_t at = l3 + 40;
    while (next_header != 17) {
        if (at + 8 > n) return 0;
        if (next_header == 44) { /* fragment header */
            if (be16(d + at + 2) & 0xFFF8) return 0; /* a non-first fragment */
            next_header = d[at];
            at += 8;
        } else if (next_header == 0 || next_header == 43 || next_header == 60) {
            next_header = d[at];
            at += (d[at + 1] + 1) * 8;
        } else {
            return 0;
        }
    }
    return udp(d, n, at, ip_end, o);
}

/* -- receive slots: ingest._Slots.add ---------------------------------------------------------- */

/* Copy the head of a datagram (and zero the rest of its row); 1 when the batch is full. */
static inline int slot_add(Walker *w, int p, const unsigned char *head, Py_ssize_t head_len,
                           const unsigned char *more, Py_ssize_t more_len, long long length,
                           long long ts, int no_vni) {
    Slab *s = &w->slabs[p];
    long long row = w->rows[p];
    Py_ssize_t width = w->width;
    unsigned char *dst = (unsigned char *)s->buf.buf + row * width;
    Py_ssize_t first = head_len < width ? head_len : width;
    memcpy(dst, head, first);
    Py_ssize_t second = more_len < width - first ? more_len : width - first;
    if (second > 0) memcpy(dst + first, more, second);
    Py_ssize_t present = first + (second > 0 ? second : 0);
    if (present < width) memset(dst + present, 0, width - present);
    ((int64_t *)s->present.buf)[row] = present;
    ((int64_t *)s->lengths.buf)[row] = length;
    ((int64_t *)s->ts.buf)[row] = ts;
    ((unsigned char *)s->no_vni.buf)[row] = (unsigned char)no_vni;
    w->rows[p] = row + 1;
    return row + 1 == w->batch_rows;
}

/* ingest._route: returns 1 when the record filled its batch (w->full_port says which) */
static int route(Walker *w, unsigned linktype, const unsigned char *d, Py_ssize_t n,
                 long long ts) {
    unsigned ethertype;
    Py_ssize_t l3;
    if (!link_layer(linktype, d, n, &ethertype, &l3)) {
        w->skipped++;
        return 0;
    }
    Outer o;
    int found = ethertype == ETH_IPV4 ? outer_ipv4(d, n, l3, &o)
              : ethertype == ETH_IPV6 ? outer_ipv6(d, n, l3, &o) : 0;
    if (found) {
        w->mirror_datagrams++;
        w->full_port = o.port_index;
        return slot_add(w, o.port_index, d + o.start, o.end - o.start, d, 0, o.payload_len, ts,
                        0);
    }
    /* A plain packet: itself a mirrored frame, sent on as VXLAN with the caller's header. */
    w->plain_packets++;
    w->full_port = 0;
    unsigned char head[8 + 14];
    memcpy(head, w->vxlan_header, 8);
    if (linktype == 1) /* Ethernet already: the frame goes as it is */
        return slot_add(w, 0, head, 8, d, n, 8 + (long long)n, ts, w->no_vni);
    memset(head + 8, 0, 12); /* synthesised MAC addresses */
    head[20] = (unsigned char)(ethertype >> 8);
    head[21] = (unsigned char)ethertype;
    return slot_add(w, 0, head, 22, d + l3, n - l3, 8 + 14 + (long long)(n - l3), ts, w->no_vni);
}

/* The capture clock, then the record's batch. ST_TICK leaves the record unread (pos is not
 * advanced): the next call meets it again, finds the tick done, and routes it. */
static inline int take(Walker *w, unsigned linktype, const unsigned char *d, Py_ssize_t n,
                       long long ts) {
    if (ts > w->clock) w->clock = ts;
    if (!w->ticking) {
        w->ticking = 1;
        w->tick_base = w->clock;
    } else if (w->clock - TICK_NS >= w->tick_base) {
        w->tick_base = w->clock;
        return ST_TICK;
    }
    w->records++;
    return route(w, linktype, d, n, ts) ? ST_FULL : -1;
}

/* -- classic pcap: capture._pcap_records ------------------------------------------------------- */

static int pcap_header(Walker *w) {
    const unsigned char *b = w->data.buf;
    Py_ssize_t n = w->data.len;
    if (n < 24)
        return fail(w, 0, "pcap file header at offset 0 is cut: %zd of 24 bytes", n);
    uint32_t magic = rd32(b, 0);
    w->swap = magic == 0xD4C3B2A1u || magic == 0x4D3CB2A1u;
    w->nano = magic == 0xA1B23C4Du || magic == 0x4D3CB2A1u;
    w->pcap_linktype = (uint16_t)(rd32(b + 20, w->swap) & 0xFFFF);
    w->pos = 24;
    w->format = FMT_PCAP;
    return -1;
}

static int pcap_walk(Walker *w, Py_ssize_t until) {
    const unsigned char *b = w->data.buf;
    Py_ssize_t end = w->data.len, pos = w->pos;
    const int swap = w->swap;
    const long long frac_ns = w->nano ? 1 : 1000;
    const unsigned linktype = w->pcap_linktype;
    int status = ST_DONE;
    while (1) {
        mark_record(w, pos);
        Py_ssize_t left = end - pos;
        if (left < 16) {
            if (left > 0)
                status = fail(w, pos, "record %lld at offset %zd is cut: %zd bytes left, its "
                              "header needs 16", w->index + 1, pos, left);
            break;
        }
        uint32_t caplen = rd32(b + pos + 8, swap);
        if (caplen > MAX_CAPLEN) {
            status = fail(w, pos, "record %lld at offset %zd has caplen %u, more than the %u "
                          "bytes a pcap record can hold", w->index + 1, pos, caplen, MAX_CAPLEN);
            break;
        }
        if ((Py_ssize_t)caplen > left - 16) {
            status = fail(w, pos, "record %lld at offset %zd is cut: caplen %u, %zd bytes left",
                          w->index + 1, pos, caplen, left - 16);
            break;
        }
        long long ts = (long long)rd32(b + pos, swap) * NS_PER_S
                       + (long long)rd32(b + pos + 4, swap) * frac_ns;
        int r = take(w, linktype, b + pos + 16, caplen, ts);
        if (r == ST_TICK) { status = r; break; }
        pos += 16 + caplen;
        w->index++;
        if (r == ST_FULL) { status = r; break; }
        if (pos >= until) { status = ST_PAUSE; break; }
    }
    w->pos = pos;
    return status;
}

/* -- pcapng: capture._pcapng_records ----------------------------------------------------------- */

static const char *block_what(uint32_t type, long long index, char *out, size_t size) {
    if (type == EPB || type == SPB || type == PB)
        snprintf(out, size, "record %lld", index + 1);
    else
        snprintf(out, size, "%s (type 0x%08x)",
                 type == SHB ? "section header block"
                 : type == IDB ? "interface description block" : "block", type);
    return out;
}

#define BLOCK_FAIL(fmt, ...)                                                                  \
    do {                                                                                      \
        char what_[64];                                                                       \
        return fail(w, pos, "%s at offset %zd " fmt,                                          \
                    block_what(type, w->index, what_, sizeof what_), pos, __VA_ARGS__);       \
    } while (0)

/* if_tsresol and if_tsoffset: ns = ts * 1e9 // ticks_per_s + offset, exact as Python's ints */
static int timestamp_ns(const Interface *iface, uint64_t raw, long long *out) {
    unsigned __int128 scaled = (unsigned __int128)raw * (unsigned __int128)NS_PER_S, q;
    int e = iface->ts_exponent;
    static const long long down[10] = {1000000000, 100000000, 10000000, 1000000, 100000, 10000,
                                       1000, 100, 10, 1};
    if (iface->ts_base == 10 && e <= 9) {
        q = (unsigned __int128)raw * down[e]; /* the common units: no 128-bit division */
    } else if (iface->ts_base == 2) {
        q = e >= 128 ? 0 : scaled >> e;
    } else if (e > 38) {
        q = 0; /* 10**39 > 2**94 > scaled */
    } else {
        unsigned __int128 ticks = 1;
        for (int i = 0; i < e; i++) ticks *= 10;
        q = scaled / ticks;
    }
    __int128 ns = (__int128)q + iface->offset_ns;
    if (ns > INT64_MAX || ns < INT64_MIN) return 0;
    *out = (long long)ns;
    return 1;
}

static int add_interface(Walker *w, const unsigned char *b, Py_ssize_t pos, uint32_t block_len) {
    int swap = w->swap;
    Interface iface = {rd16(b + pos + 8, swap), rd32(b + pos + 12, swap), 10, 6, 0};
    Py_ssize_t at = pos + 16, end = pos + block_len - 4;
    while (at + 4 <= end) {
        unsigned code = rd16(b + at, swap), length = rd16(b + at + 2, swap);
        Py_ssize_t value_at = at + 4;
        if (code == 0 || value_at + length > end) break;
        if (code == 9 && length >= 1) { /* if_tsresol: high bit clear 10^-n, set 2^-n */
            iface.ts_base = b[value_at] & 0x80 ? 2 : 10;
            iface.ts_exponent = b[value_at] & 0x7F;
        } else if (code == 14 && length >= 8) { /* if_tsoffset, seconds */
            int64_t seconds;
            uint64_t raw;
            memcpy(&raw, b + value_at, 8);
            if (swap) raw = __builtin_bswap64(raw);
            memcpy(&seconds, &raw, 8);
            iface.offset_ns = (__int128)seconds * NS_PER_S;
        }
        at = value_at + (length + 3) / 4 * 4;
    }
    if (w->n_ifaces == w->cap_ifaces) {
        Py_ssize_t cap = w->cap_ifaces ? w->cap_ifaces * 2 : 4;
        Interface *grown = PyMem_RawRealloc(w->ifaces, cap * sizeof(Interface));
        if (grown == NULL) return 0;
        w->ifaces = grown;
        w->cap_ifaces = cap;
    }
    w->ifaces[w->n_ifaces++] = iface;
    return 1;
}

/* One block at w->pos: -1 to go on, or a status. Only a packet block that is taken moves
 * the record index; every block that is read moves w->pos. */
static int pcapng_block(Walker *w) {
    const unsigned char *b = w->data.buf;
    Py_ssize_t end = w->data.len, pos = w->pos, left = end - pos;
    mark_record(w, pos);
    if (left == 0) return ST_DONE;
    if (left < 12)
        return fail(w, pos, "block at offset %zd is cut: %zd bytes left, the smallest block has "
                    "12", pos, left);
    if (memcmp(b + pos, "\x0a\x0d\x0d\x0a", 4) == 0) { /* a new section: new byte order */
        const unsigned char *m = b + pos + 8;
        if (memcmp(m, "\x4d\x3c\x2b\x1a", 4) == 0) w->swap = 0;
        else if (memcmp(m, "\x1a\x2b\x3c\x4d", 4) == 0) w->swap = 1;
        else
            return fail(w, pos, "section header block at offset %zd has byte-order magic "
                        "0x%02x%02x%02x%02x, neither 1a2b3c4d nor 4d3c2b1a", pos, m[0], m[1],
                        m[2], m[3]);
        w->n_ifaces = 0;
    }
    const int swap = w->swap;
    uint32_t type = rd32(b + pos, swap), block_len = rd32(b + pos + 4, swap);
    if (block_len % 4) BLOCK_FAIL("has length %u, not a multiple of 4", block_len);
    uint32_t smallest = type == SHB ? 28 : type == IDB ? 20 : type == PB ? 32 : type == SPB ? 16
                      : type == EPB ? 32 : 12;
    if (block_len < smallest) BLOCK_FAIL("has length %u, smaller than %u", block_len, smallest);
    int known = type == SHB || type == IDB || type == PB || type == SPB || type == EPB;
    if (!known) { /* skipped by its length, whatever it is */
        if ((Py_ssize_t)block_len > left) BLOCK_FAIL("is cut: block length %u, %zd bytes left",
                                                     block_len, left);
        uint32_t trailer = rd32(b + pos + block_len - 4, swap);
        if (trailer != block_len)
            BLOCK_FAIL("has trailing length %u, leading length %u", trailer, block_len);
        w->pos = pos + block_len;
        return -1;
    }
    if (type == EPB || type == PB) { /* refuse an absurd caplen before reading the body */
        if (left < 28) BLOCK_FAIL("is cut: block length %u, %zd bytes left", block_len, left);
        uint32_t caplen = rd32(b + pos + 20, swap);
        if (caplen > MAX_CAPLEN)
            BLOCK_FAIL("has caplen %u, more than the %u bytes a packet record can hold", caplen,
                       MAX_CAPLEN);
        if (28 + (uint64_t)caplen > (uint64_t)block_len - 4)
            BLOCK_FAIL("has caplen %u, more than its %u-byte block holds", caplen, block_len);
    }
    if (block_len > MAX_BLOCK_LEN)
        BLOCK_FAIL("has length %u, more than the %u bytes allowed", block_len, MAX_BLOCK_LEN);
    if ((Py_ssize_t)block_len > left)
        BLOCK_FAIL("is cut: block length %u, %zd bytes left", block_len, left);
    uint32_t trailer = rd32(b + pos + block_len - 4, swap);
    if (trailer != block_len)
        BLOCK_FAIL("has trailing length %u, leading length %u", trailer, block_len);
    if (type == IDB) {
        if (!add_interface(w, b, pos, block_len)) return -2; /* no memory: no GIL to say so */
        w->pos = pos + block_len;
        return -1;
    }
    if (type == SHB) {
        unsigned major = rd16(b + pos + 12, swap), minor = rd16(b + pos + 14, swap);
        if (major != 1) BLOCK_FAIL("has pcapng version %u.%u: only 1.x exists", major, minor);
        w->pos = pos + block_len;
        return -1;
    }
    /* a packet block */
    unsigned interface;
    Py_ssize_t data_at, caplen;
    long long ts = 0;
    if (type == SPB) {
        interface = 0;
        data_at = pos + 12;
    } else {
        interface = type == EPB ? rd32(b + pos + 8, swap) : rd16(b + pos + 8, swap);
        data_at = pos + 28;
    }
    if (interface >= (unsigned long long)w->n_ifaces)
        BLOCK_FAIL("names interface %u, but its section declares %zd", interface, w->n_ifaces);
    const Interface *iface = &w->ifaces[interface];
    if (type == SPB) {
        /* interface 0, no timestamp; the captured length min(original length, snaplen), and
         * never past the block (whose data is padded to 4) */
        uint32_t wire_len = rd32(b + pos + 8, swap);
        uint64_t n = wire_len < block_len - 16 ? wire_len : block_len - 16;
        if (iface->snaplen && iface->snaplen < n) n = iface->snaplen;
        if (n > MAX_CAPLEN)
            BLOCK_FAIL("has caplen %llu, more than the %u bytes a packet record can hold",
                       (unsigned long long)n, MAX_CAPLEN);
        caplen = (Py_ssize_t)n;
    } else {
        caplen = rd32(b + pos + 20, swap);
        uint64_t raw = ((uint64_t)rd32(b + pos + 12, swap) << 32) | rd32(b + pos + 16, swap);
        if (!timestamp_ns(iface, raw, &ts))
            BLOCK_FAIL("has a timestamp outside what 64-bit nanoseconds hold (years 1677 to "
                       "2262)%s", "");
    }
    int r = take(w, iface->linktype, b + data_at, caplen, ts);
    if (r == ST_TICK) return r;
    w->pos = pos + block_len;
    w->index++;
    return r;
}

static int pcapng_walk(Walker *w, Py_ssize_t until) {
    while (1) {
        int r = pcapng_block(w);
        if (r != -1) return r;
        if (w->pos >= until) return ST_PAUSE;
    }
}

/* -- the type ---------------------------------------------------------------------------------- */

static void release_views(Walker *w) {
    for (int p = 0; p < PORTS; p++) {
        Slab *s = &w->slabs[p];
        Py_buffer *views[] = {&s->buf, &s->lengths, &s->present, &s->ts, &s->no_vni};
        for (int i = 0; i < s->held; i++) PyBuffer_Release(views[i]);
        s->held = 0;
    }
    if (w->data_held) {
        PyBuffer_Release(&w->data);
        w->data_held = 0;
    }
}

static void Walker_dealloc(Walker *w) {
    release_views(w);
    PyMem_RawFree(w->ifaces);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static int get_view(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t items,
                    const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != itemsize || view->len != itemsize * items) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes of %zd-byte items, expected %zd items",
                     what, view->len, view->itemsize, items);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int Walker_init(Walker *w, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"data", "slots", "vxlan_header", "no_vni", NULL};
    PyObject *data, *slots;
    Py_buffer header;
    int no_vni;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOy*p", kwlist, &data, &slots, &header,
                                     &no_vni))
        return -1;
    if (w->busy) {
        PyBuffer_Release(&header);
        PyErr_SetString(PyExc_RuntimeError, "walker is running in another thread");
        return -1;
    }
    release_views(w);
    if (header.len != 8) {
        PyBuffer_Release(&header);
        PyErr_SetString(PyExc_ValueError, "vxlan_header must be 8 bytes");
        return -1;
    }
    memcpy(w->vxlan_header, header.buf, 8);
    PyBuffer_Release(&header);
    w->no_vni = no_vni;
    if (PyObject_GetBuffer(data, &w->data, PyBUF_SIMPLE) < 0) return -1;
    w->data_held = 1;
    /* slots: three (buf, lengths, present, ts, no_vni) for ports 4789, 4790, 6081 */
    if (!PyTuple_Check(slots) || PyTuple_GET_SIZE(slots) != PORTS) {
        PyErr_SetString(PyExc_TypeError, "slots must be a tuple of 3 slabs");
        return -1;
    }
    for (int p = 0; p < PORTS; p++) {
        PyObject *slab = PyTuple_GET_ITEM(slots, p);
        if (!PyTuple_Check(slab) || PyTuple_GET_SIZE(slab) != 5) {
            PyErr_SetString(PyExc_TypeError,
                            "a slab is (buf, lengths, present, ts, no_vni)");
            return -1;
        }
        Slab *s = &w->slabs[p];
        Py_buffer *buf = &s->buf;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(slab, 0), buf,
                               PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_STRIDES) < 0)
            return -1;
        s->held = 1;
        if (buf->ndim != 2 || buf->itemsize != 1) {
            PyErr_SetString(PyExc_ValueError, "a slab's buf must be 2-D uint8");
            return -1;
        }
        if (p == 0) {
            w->batch_rows = buf->shape[0];
            w->width = buf->shape[1];
            if (w->batch_rows < 1 || w->width < 22) {
                PyErr_SetString(PyExc_ValueError, "slabs need a row and 22 bytes a row");
                return -1;
            }
        } else if (buf->shape[0] != w->batch_rows || buf->shape[1] != w->width) {
            PyErr_SetString(PyExc_ValueError, "slabs of different shapes");
            return -1;
        }
        Py_buffer *views[] = {&s->lengths, &s->present, &s->ts, &s->no_vni};
        const Py_ssize_t sizes[] = {8, 8, 8, 1};
        const char *names[] = {"lengths", "present", "ts", "no_vni"};
        for (int i = 0; i < 4; i++) {
            if (get_view(PyTuple_GET_ITEM(slab, i + 1), views[i], sizes[i], w->batch_rows,
                         names[i]) < 0)
                return -1;
            s->held++;
        }
    }
    w->format = FMT_HEADER;
    w->pos = 0;
    w->index = 0;
    w->n_ifaces = 0;
    w->failed = 0;
    w->records = w->mirror_datagrams = w->plain_packets = w->skipped = 0;
    return 0;
}

static PyObject *Walker_run(Walker *w, PyObject *args) {
    Py_ssize_t until = PY_SSIZE_T_MAX;
    if (!PyArg_ParseTuple(args, "|n", &until)) return NULL;
    if (!w->data_held) {
        PyErr_SetString(PyExc_ValueError, "walker is closed");
        return NULL;
    }
    if (w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "walker is running in another thread");
        return NULL;
    }
    if (w->failed) return PyLong_FromLong(ST_ERROR);
    for (int p = 0; p < PORTS; p++) {
        if (w->rows[p] < 0 || w->rows[p] >= w->batch_rows) {
            PyErr_Format(PyExc_ValueError, "rows[%d] = %lld: feed the batch first", p, w->rows[p]);
            return NULL;
        }
    }
    int status;
    if (w->format == FMT_HEADER) {
        const unsigned char *b = w->data.buf;
        Py_ssize_t n = w->data.len;
        if (n >= 4 && memcmp(b, "\x0a\x0d\x0d\x0a", 4) == 0) {
            w->format = FMT_PCAPNG;
        } else {
            uint32_t magic = n >= 4 ? rd32(b, 0) : 0;
            if (n < 4 || !(magic == 0xA1B2C3D4u || magic == 0xA1B23C4Du || magic == 0xD4C3B2A1u
                           || magic == 0x4D3CB2A1u)) {
                char shown[32] = "no bytes";
                if (n > 0) {
                    int k = snprintf(shown, sizeof shown, "magic 0x");
                    for (Py_ssize_t i = 0; i < n && i < 4; i++)
                        k += snprintf(shown + k, sizeof shown - k, "%02x", b[i]);
                }
                status = fail(w, 0, "not a pcap or pcapng file: %s at offset 0", shown);
                return PyLong_FromLong(status);
            }
            if (pcap_header(w) == ST_ERROR) return PyLong_FromLong(ST_ERROR);
        }
    }
    w->busy = 1;
    sigjmp_buf jump;
    bus_catch();
    Py_BEGIN_ALLOW_THREADS
    if (sigsetjmp(jump, 1) == 0) {
        bus_jump = &jump;
        status = w->format == FMT_PCAP ? pcap_walk(w, until) : pcapng_walk(w, until);
    } else { /* SIGBUS: the record at w->pos is not all there any more; its counts undone */
        w->records = w->mark[0];
        w->mirror_datagrams = w->mark[1];
        w->plain_packets = w->mark[2];
        w->skipped = w->mark[3];
        status = fail(w, w->pos, "record %lld at offset %zd is cut: the file was truncated "
                      "while it was being read (no bytes at offset %zd any more)", w->index + 1,
                      w->pos, (Py_ssize_t)(bus_address - (uintptr_t)w->data.buf));
    }
    bus_jump = NULL;
    Py_END_ALLOW_THREADS
    bus_release();
    w->busy = 0;
    if (status == -2) return PyErr_NoMemory();
    return PyLong_FromLong(status);
}

static PyObject *Walker_close(Walker *w, PyObject *Py_UNUSED(ignored)) {
    if (w->busy) {
        PyErr_SetString(PyExc_RuntimeError, "walker is running in another thread");
        return NULL;
    }
    release_views(w);
    Py_RETURN_NONE;
}

static PyObject *Walker_get_rows(Walker *w, void *closure) {
    return Py_BuildValue("(LLL)", w->rows[0], w->rows[1], w->rows[2]);
}

static int Walker_set_rows(Walker *w, PyObject *value, void *closure) {
    long long r[PORTS];
    if (value == NULL || !PyArg_ParseTuple(value, "LLL", &r[0], &r[1], &r[2])) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "rows is a tuple of 3 ints");
        return -1;
    }
    memcpy(w->rows, r, sizeof r);
    return 0;
}

static PyObject *Walker_get_next_tick(Walker *w, void *closure) {
    if (!w->ticking) Py_RETURN_NONE;
    PyObject *base = PyLong_FromLongLong(w->tick_base), *tick = PyLong_FromLongLong(TICK_NS);
    PyObject *sum = base && tick ? PyNumber_Add(base, tick) : NULL;
    Py_XDECREF(base);
    Py_XDECREF(tick);
    return sum;
}

static int Walker_set_next_tick(Walker *w, PyObject *value, void *closure) {
    if (value == NULL || value == Py_None) {
        w->ticking = 0;
        return 0;
    }
    /* next_tick may lie past 2**63 - 1 (a clock near the end of time): keep its base */
    PyObject *tick = PyLong_FromLongLong(TICK_NS);
    PyObject *base = tick ? PyNumber_Subtract(value, tick) : NULL;
    Py_XDECREF(tick);
    if (base == NULL) return -1;
    long long tick_base = PyLong_AsLongLong(base);
    Py_DECREF(base);
    if (tick_base == -1 && PyErr_Occurred()) return -1;
    w->ticking = 1;
    w->tick_base = tick_base;
    return 0;
}

static PyObject *Walker_get_error(Walker *w, void *closure) {
    if (!w->failed) Py_RETURN_NONE;
    return Py_BuildValue("(ns)", w->error_offset, w->error);
}

static PyMemberDef Walker_members[] = {
    {"offset", T_PYSSIZET, offsetof(Walker, pos), READONLY,
     "file offset of the next record or block"},
    {"index", T_LONGLONG, offsetof(Walker, index), READONLY, "records read (Record.index)"},
    {"clock", T_LONGLONG, offsetof(Walker, clock), 0, "the capture clock, ns (ingest's)"},
    {"full_port", T_INT, offsetof(Walker, full_port), READONLY,
     "after FULL: the slab (0, 1, 2) that is full"},
    {"records", T_LONGLONG, offsetof(Walker, records), 0, NULL},
    {"mirror_datagrams", T_LONGLONG, offsetof(Walker, mirror_datagrams), 0, NULL},
    {"plain_packets", T_LONGLONG, offsetof(Walker, plain_packets), 0, NULL},
    {"skipped", T_LONGLONG, offsetof(Walker, skipped), 0, NULL},
    {NULL},
};

static PyGetSetDef Walker_getset[] = {
    {"rows", (getter)Walker_get_rows, (setter)Walker_set_rows, "rows filled per slab", NULL},
    {"next_tick", (getter)Walker_get_next_tick, (setter)Walker_set_next_tick,
     "capture time of the next tick (None before the first record)", NULL},
    {"error", (getter)Walker_get_error, NULL, "(offset, detail) after ERROR, else None", NULL},
    {NULL},
};

static PyMethodDef Walker_methods[] = {
    {"run", (PyCFunction)Walker_run, METH_VARARGS,
     "run(until=end) -> status: walk records until a slab is full (FULL), the clock ticks "
     "(TICK), the offset passes `until` (PAUSE), the data ends (DONE) or is faulty (ERROR)."},
    {"close", (PyCFunction)Walker_close, METH_NOARGS, "release the buffers"},
    {NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "collector._fastcapture.Walker",
    .tp_doc = "Walker(data, slots, vxlan_header, no_vni): one capture file into receive slabs",
    .tp_basicsize = sizeof(Walker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Walker_init,
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_methods = Walker_methods,
    .tp_members = Walker_members,
    .tp_getset = Walker_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "collector._fastcapture",
    "Capture records walked, peeled and batched in C (see collector/ingest.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastcapture(void) {
    if (PyType_Ready(&WalkerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(m, "Walker", (PyObject *)&WalkerType) < 0
        || PyModule_AddIntConstant(m, "DONE", ST_DONE) < 0
        || PyModule_AddIntConstant(m, "FULL", ST_FULL) < 0
        || PyModule_AddIntConstant(m, "TICK", ST_TICK) < 0
        || PyModule_AddIntConstant(m, "ERROR", ST_ERROR) < 0
        || PyModule_AddIntConstant(m, "PAUSE", ST_PAUSE) < 0
        || PyModule_AddIntConstant(m, "MAX_CAPLEN", MAX_CAPLEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
