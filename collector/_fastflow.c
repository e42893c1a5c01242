/* collector._fastflow: the compiled hot path behind Pipeline.feed.
 *
 * Two parts, each a line-by-line transcription of a pure-Python reference that stays the
 * readable specification (and that the tests compare this code against on generated input):
 *
 *   decode()     collector/decode/{datagram,vxlan,geneve,ethernet,ipv4,ipv6,l4}.py, for every
 *                row of a receive slab, into the columns of a PacketBatch.
 *   FlowTable    collector/flows/table.py: the same keys, directions, counters, expiry
 *                reasons and export order, with flow state in compact C records instead of a
 *                Python object per flow (issue 6: <= 200 bytes per active flow).
 *
 * Ended flows leave as columns (take()), turned into the Arrow flows batch by
 * collector/flows/fast.py without a Python object per flow. Address text and Community ID
 * are computed here too (collector/store/rows.py, collector/flows/community_id.py).
 *
 * Nothing here reads a clock, a socket or a file: timestamps come in with the packets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* ============================================================================================
 * Columns of collector.decode.batch.PacketBatch, in its field order, with their item sizes.
 * fast.py checks the names and dtypes against the dataclass at import.
 * ========================================================================================== */
enum {
    C_REASON, C_ENCAP, C_VNI, C_RESERVED, C_GENEVE_VNI, C_CAPTURED, C_ETHERTYPE, C_VLAN,
    C_INNER_VLAN, C_VLAN_COUNT, C_L3, C_IPV, C_IHL, C_TOS, C_TTL, C_IPID, C_FRAG, C_MORE,
    C_PROTO, C_SRC_HI, C_SRC_LO, C_DST_HI, C_DST_LO, C_SRC_OK, C_DST_OK, C_WIRE, C_L4,
    C_SPORT, C_DPORT, C_FLAGS, C_ICMP_TYPE, C_ICMP_CODE, C_TRUNC, NCOLS
};
static const int COL_SIZE[NCOLS] = {1, 1, 4, 1, 4, 4, 4, 2, 2, 1, 2, 1, 2, 2, 2, 8, 4, 1,
                                    2, 8, 8, 8, 8, 1, 1, 4, 2, 4, 4, 2, 2, 2, 1};

/* collector.decode.errors.Reason, as REASONS numbers them (0: decoded) */
enum {
    RSN_OK, R_VXLAN_TRUNCATED, R_VXLAN_NO_VNI_FLAG, R_VXLAN_GPE_VERSION, R_GENEVE_TRUNCATED,
    R_GENEVE_VERSION, R_GENEVE_OPTION_LENGTH, R_IP_VERSION, R_IPV4_HEADER_LENGTH,
    R_IPV4_TOTAL_LENGTH, R_TCP_HEADER_LENGTH, R_UDP_LENGTH
};
enum { ENC_VXLAN, ENC_GPE, ENC_GENEVE, ENC_GENEVE_VXLAN };
enum { LINK_ETH, LINK_V4, LINK_V6, LINK_OTHER };

typedef struct {
    Py_buffer view[NCOLS];
    int held;
} Columns;

static void columns_release(Columns *c) {
    for (int i = 0; i < c->held; i++) PyBuffer_Release(&c->view[i]);
    c->held = 0;
}

/* Borrow the NCOLS arrays of `seq` (n rows each, C-contiguous, of the expected item size). */
static int columns_get(Columns *c, PyObject *seq, Py_ssize_t n, bool writable) {
    c->held = 0;
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) != NCOLS) {
        PyErr_Format(PyExc_ValueError, "expected a tuple of %d columns", NCOLS);
        return -1;
    }
    for (int i = 0; i < NCOLS; i++) {
        int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(seq, i), &c->view[i], flags) < 0) {
            columns_release(c);
            return -1;
        }
        c->held++;
        if (c->view[i].len != n * COL_SIZE[i]) {
            PyErr_Format(PyExc_ValueError, "column %d: %zd bytes, expected %zd rows of %d",
                         i, c->view[i].len, n, COL_SIZE[i]);
            columns_release(c);
            return -1;
        }
    }
    return 0;
}

#define COL(c, i, T) ((T *)(c)->view[i].buf)

/* ============================================================================================
 * Decoder: decode_datagram(payload[:present], port, length=length) for one row.
 * ========================================================================================== */
typedef struct {
    int64_t vni, geneve_vni, ethertype, l3_offset, ip_version, ip_header_len, ip_tos, ip_ttl,
        ip_id, frag_offset, more, ip_proto, wire_len, l4_offset, sport, dport, tcp_flags,
        icmp_type, icmp_code, captured_len;
    int encap, link, vlan_n, vlans[2];
    bool reserved, truncated, src_ok, dst_ok, v4_addr;
    const uint8_t *src, *dst;
} Dec;

#define U16(p) ((int64_t)(((unsigned)(p)[0] << 8) | (p)[1]))
#define U24(p) ((int64_t)(((unsigned)(p)[0] << 16) | ((unsigned)(p)[1] << 8) | (p)[2]))
#define U32(p) ((int64_t)(((uint64_t)(p)[0] << 24) | ((unsigned)(p)[1] << 16) | \
                          ((unsigned)(p)[2] << 8) | (p)[3]))

static void dec_init(Dec *d) {
    d->vni = d->geneve_vni = d->ethertype = d->l3_offset = d->ip_version = d->ip_header_len =
        d->ip_tos = d->ip_ttl = d->ip_id = d->frag_offset = d->more = d->ip_proto =
            d->wire_len = d->l4_offset = d->sport = d->dport = d->tcp_flags = d->icmp_type =
                d->icmp_code = -1;
    d->captured_len = 0;
    d->encap = ENC_VXLAN;
    d->link = LINK_ETH;
    d->vlan_n = 0;
    d->reserved = d->truncated = d->src_ok = d->dst_ok = d->v4_addr = false;
    d->src = d->dst = NULL;
}

/* vxlan.parse; returns a reason (0: ok) and the inner offset in *inner */
static int vxlan_parse(const uint8_t *b, Py_ssize_t off, Py_ssize_t end, Dec *d,
                       Py_ssize_t *inner) {
    if (end - off < 8) return R_VXLAN_TRUNCATED;
    uint8_t flags = b[off];
    if (!(flags & 0x08)) return R_VXLAN_NO_VNI_FLAG;
    d->vni = U24(b + off + 4);
    /* OR: behind a GWLB the GENEVE header's reserved bits were recorded first */
    d->reserved = d->reserved || flags != 0x08 || b[off + 1] || b[off + 2] || b[off + 3] ||
                  b[off + 7];
    d->link = LINK_ETH;
    *inner = off + 8;
    return RSN_OK;
}

static int gpe_parse(const uint8_t *b, Py_ssize_t end, Dec *d, Py_ssize_t *inner) {
    if (end < 8) return R_VXLAN_TRUNCATED;
    uint8_t flags = b[0];
    if (flags & 0x30) return R_VXLAN_GPE_VERSION;
    if (!(flags & 0x08)) return R_VXLAN_NO_VNI_FLAG;
    d->encap = ENC_GPE;
    d->vni = U24(b + 4);
    d->reserved = (flags & 0xF0) || b[1] || b[7];
    if (flags & 0x04) {
        int next = b[3];
        d->link = next == 1 ? LINK_V4 : next == 2 ? LINK_V6 : (next == 3 || next == 0) ? LINK_ETH
                                                                                     : LINK_OTHER;
    } else {
        d->link = LINK_ETH;
    }
    *inner = 8;
    return RSN_OK;
}

static int geneve_parse(const uint8_t *b, Py_ssize_t end, Dec *d, Py_ssize_t *inner) {
    if (end < 8) return R_GENEVE_TRUNCATED;
    if (b[0] >> 6) return R_GENEVE_VERSION;
    Py_ssize_t options_end = 8 + (Py_ssize_t)(b[0] & 0x3F) * 4;
    if (options_end > end) return R_GENEVE_TRUNCATED;
    int64_t protocol = U16(b + 2);
    d->encap = ENC_GENEVE;
    d->geneve_vni = d->vni = U24(b + 4);
    d->reserved = (b[1] & 0x3F) || b[7];
    d->link = protocol == 0x6558 ? LINK_ETH : protocol == 0x0800 ? LINK_V4
            : protocol == 0x86DD ? LINK_V6 : LINK_OTHER;
    if (d->link != LINK_ETH) d->ethertype = protocol;
    Py_ssize_t off = 8;
    while (off < options_end) {
        if (options_end - off < 4) return R_GENEVE_OPTION_LENGTH;
        off = off + 4 + (Py_ssize_t)(b[off + 3] & 0x1F) * 4;
        if (off > options_end) return R_GENEVE_OPTION_LENGTH;
    }
    *inner = options_end;
    return RSN_OK;
}

/* geneve.vxlan_offset: -1 for None */
static Py_ssize_t vxlan_offset(const uint8_t *b, Py_ssize_t off, Py_ssize_t end, int link) {
    Py_ssize_t udp;
    if (link == LINK_V4) {
        if (end - off < 20 || b[off] >> 4 != 4 || b[off + 9] != 17) return -1;
        if (U16(b + off + 6) & 0x1FFF) return -1;
        udp = off + (Py_ssize_t)(b[off] & 0x0F) * 4;
    } else if (link == LINK_V6) {
        if (end - off < 40 || b[off] >> 4 != 6 || b[off + 6] != 17) return -1;
        udp = off + 40;
    } else {
        return -1;
    }
    if (udp < off + 20 || end - udp < 8) return -1;
    if (U16(b + udp + 2) != 4789) return -1;
    return udp + 8;
}

#define NONE_OFF (-1)
#define ERR_OFF (-2)

/* ipv4.parse: the L4 offset, NONE_OFF, or ERR_OFF with *reason set */
static Py_ssize_t ipv4_parse(const uint8_t *b, Py_ssize_t off, Py_ssize_t end, Dec *d,
                             int *reason) {
    Py_ssize_t avail = end - off;
    if (avail < 1) return NONE_OFF;
    if (b[off] >> 4 != 4) { *reason = R_IP_VERSION; return ERR_OFF; }
    d->ip_version = 4;
    int64_t header_len = (int64_t)(b[off] & 0x0F) * 4;
    if (header_len < 20) { *reason = R_IPV4_HEADER_LENGTH; return ERR_OFF; }
    d->ip_header_len = header_len;
    if (avail >= 2) d->ip_tos = b[off + 1];
    if (avail >= 4) {
        int64_t total = U16(b + off + 2);
        if (total == 0) {
            /* TSO leaves 0 here: length unknown */
        } else if (total < header_len) {
            *reason = R_IPV4_TOTAL_LENGTH;
            return ERR_OFF;
        } else {
            d->wire_len = total;
        }
    }
    if (avail >= 6) d->ip_id = U16(b + off + 4);
    if (avail >= 8) {
        int64_t field = U16(b + off + 6);
        d->more = (field & 0x2000) != 0;
        d->frag_offset = (field & 0x1FFF) * 8;
    }
    if (avail >= 9) d->ip_ttl = b[off + 8];
    if (avail >= 10) d->ip_proto = b[off + 9];
    if (avail >= 16) { d->src = b + off + 12; d->src_ok = true; }
    if (avail >= 20) { d->dst = b + off + 16; d->dst_ok = true; }
    d->v4_addr = true;
    if (avail < header_len || d->frag_offset > 0) return NONE_OFF;
    return off + header_len;
}

static bool ipv6_generic(int h) {
    return h == 0 || h == 43 || h == 60 || h == 135 || h == 139 || h == 140;
}

static void ipv6_upper(Dec *d, int protocol, bool fragment_seen) {
    d->ip_proto = protocol;
    if (!fragment_seen) { d->frag_offset = 0; d->more = 0; }
}

static Py_ssize_t ipv6_parse(const uint8_t *b, Py_ssize_t off, Py_ssize_t end, Dec *d,
                             int *reason) {
    Py_ssize_t avail = end - off;
    if (avail < 1) return NONE_OFF;
    if (b[off] >> 4 != 6) { *reason = R_IP_VERSION; return ERR_OFF; }
    d->ip_version = 6;
    if (avail >= 2) d->ip_tos = ((b[off] & 0x0F) << 4) | (b[off + 1] >> 4);
    if (avail >= 6) {
        int64_t payload = U16(b + off + 4);
        d->wire_len = payload ? 40 + payload : -1; /* 0: a jumbogram */
    }
    if (avail >= 8) d->ip_ttl = b[off + 7];
    if (avail >= 24) { d->src = b + off + 8; d->src_ok = true; }
    if (avail >= 40) { d->dst = b + off + 24; d->dst_ok = true; }
    if (avail < 7) return NONE_OFF;
    int next = b[off + 6];
    Py_ssize_t at = off + 40;
    bool fragment_seen = false;
    for (;;) {
        Py_ssize_t length;
        if (next == 44) {
            if (at + 8 > end) return NONE_OFF;
            fragment_seen = true;
            int64_t field = U16(b + at + 2);
            d->frag_offset = field & 0xFFF8;
            d->more = (field & 1) != 0;
            d->ip_id = U32(b + at + 4);
            next = b[at];
            length = 8;
        } else if (ipv6_generic(next) || next == 51) {
            if (at + 1 > end) return NONE_OFF;
            int following = b[at];
            if (at + 2 > end) {
                if (!ipv6_generic(following) && following != 51 && following != 44)
                    ipv6_upper(d, following, fragment_seen);
                return NONE_OFF;
            }
            length = next == 51 ? ((Py_ssize_t)b[at + 1] + 2) * 4 : ((Py_ssize_t)b[at + 1] + 1) * 8;
            next = following;
        } else {
            ipv6_upper(d, next, fragment_seen);
            d->ip_header_len = at - off;
            if (d->frag_offset > 0 || at > end) return NONE_OFF;
            return at;
        }
        at += length;
    }
}

static int l4_parse(const uint8_t *b, Py_ssize_t off, Py_ssize_t end, int64_t protocol, Dec *d) {
    Py_ssize_t avail = end - off;
    if (protocol == 6 || protocol == 17 || protocol == 33 || protocol == 132 || protocol == 136) {
        if (avail >= 2) d->sport = U16(b + off);
        if (avail >= 4) d->dport = U16(b + off + 2);
        if (protocol == 6) {
            if (avail < 13) return RSN_OK;
            if ((b[off + 12] >> 4) < 5) return R_TCP_HEADER_LENGTH;
            if (avail >= 14) d->tcp_flags = ((b[off + 12] & 1) << 8) | b[off + 13];
        } else if (protocol == 17 && avail >= 6) {
            int64_t udp_len = U16(b + off + 4);
            if (udp_len > 0 && udp_len < 8) return R_UDP_LENGTH;
        }
    } else if (protocol == 1 || protocol == 58) {
        if (avail >= 1) d->icmp_type = b[off];
        if (avail >= 2) d->icmp_code = b[off + 1];
    }
    return RSN_OK;
}

/* datagram.decode_frame */
static int decode_frame(const uint8_t *b, Py_ssize_t base, Py_ssize_t end, int64_t length,
                        Dec *d) {
    d->captured_len = length - base;
    int64_t frame_end = length;
    Py_ssize_t l3;
    if (d->link == LINK_ETH) {
        Py_ssize_t type_at = base + 12;
        bool found = false;
        while (type_at + 2 <= end) {
            int64_t et = U16(b + type_at);
            if (et != 0x8100 && et != 0x88A8 && et != 0x9100) {
                /* an 802.3 frame carries its length here: no ethertype */
                d->ethertype = et >= 0x0600 ? et : -1;
                found = true;
                break;
            }
            if (type_at + 4 > end) break; /* the tag's TCI was cut */
            if (d->vlan_n < 2) d->vlans[d->vlan_n] = (int)(U16(b + type_at + 2) & 0x0FFF);
            d->vlan_n++;
            type_at += 4;
        }
        if (!found) {
            d->truncated = end == frame_end;
            return RSN_OK;
        }
        l3 = type_at + 2;
    } else if (d->link == LINK_V4) {
        l3 = base;
        d->ethertype = 0x0800;
    } else if (d->link == LINK_V6) {
        l3 = base;
        d->ethertype = 0x86DD;
    } else {
        return RSN_OK;
    }
    int reason = RSN_OK;
    Py_ssize_t l4_at;
    if (d->ethertype == 0x0800) {
        d->l3_offset = l3 - base;
        l4_at = ipv4_parse(b, l3, end, d, &reason);
    } else if (d->ethertype == 0x86DD) {
        d->l3_offset = l3 - base;
        l4_at = ipv6_parse(b, l3, end, d, &reason);
    } else {
        return RSN_OK; /* ARP, LLDP, MPLS...: reported by ethertype only */
    }
    if (l4_at == ERR_OFF) return reason;
    int64_t ip_bytes = frame_end - l3;
    Py_ssize_t l4_end = end;
    if (d->wire_len >= 0) {
        d->truncated = ip_bytes < d->wire_len;
        if (l3 + d->wire_len < l4_end) l4_end = l3 + d->wire_len; /* padding is not L4 */
    } else {
        int64_t need = d->ip_version == 4 ? 4 : d->ip_version == 6 ? 6 : 1;
        d->truncated = ip_bytes < need;
    }
    if (l4_at >= 0 && d->ip_proto >= 0) {
        d->l4_offset = l4_at - base;
        return l4_parse(b, l4_at, l4_end, d->ip_proto, d);
    }
    return RSN_OK;
}

static int decode_one(const uint8_t *b, Py_ssize_t end, int64_t length, int port, Dec *d) {
    Py_ssize_t inner = 0;
    int reason;
    dec_init(d);
    if (port == 4789) reason = vxlan_parse(b, 0, end, d, &inner);
    else if (port == 4790) reason = gpe_parse(b, end, d, &inner);
    else reason = geneve_parse(b, end, d, &inner);
    if (reason) return reason;
    if (port == 6081) {
        Py_ssize_t at = vxlan_offset(b, inner, end, d->link);
        if (at >= 0) {
            /* GWLB delivering mirrored traffic: the session VNI is the VXLAN one */
            reason = vxlan_parse(b, at, end, d, &inner);
            if (reason) return reason;
            d->encap = ENC_GENEVE_VXLAN;
            d->ethertype = -1;
        }
    }
    return decode_frame(b, inner, end, length, d);
}

static inline uint64_t be64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

static void store_row(Columns *c, Py_ssize_t i, int reason, const Dec *d) {
    COL(c, C_REASON, uint8_t)[i] = (uint8_t)reason;
    bool ok = reason == RSN_OK;
#define PUT(col, T, v) COL(c, col, T)[i] = (T)(ok ? (v) : -1)
    PUT(C_ENCAP, int8_t, d->encap);
    PUT(C_VNI, int32_t, d->vni);
    COL(c, C_RESERVED, uint8_t)[i] = ok && d->reserved;
    PUT(C_GENEVE_VNI, int32_t, d->geneve_vni);
    PUT(C_CAPTURED, int32_t, d->captured_len);
    PUT(C_ETHERTYPE, int32_t, d->ethertype);
    int n = ok ? (d->vlan_n < 2 ? d->vlan_n : 2) : 0;
    COL(c, C_VLAN, int16_t)[i] = (int16_t)(n >= 1 ? d->vlans[0] : -1);
    COL(c, C_INNER_VLAN, int16_t)[i] = (int16_t)(n >= 2 ? d->vlans[1] : -1);
    COL(c, C_VLAN_COUNT, int8_t)[i] = (int8_t)n;
    PUT(C_L3, int16_t, d->l3_offset);
    PUT(C_IPV, int8_t, d->ip_version);
    PUT(C_IHL, int16_t, d->ip_header_len);
    PUT(C_TOS, int16_t, d->ip_tos);
    PUT(C_TTL, int16_t, d->ip_ttl);
    PUT(C_IPID, int64_t, d->ip_id);
    PUT(C_FRAG, int32_t, d->frag_offset);
    PUT(C_MORE, int8_t, d->more);
    PUT(C_PROTO, int16_t, d->ip_proto);
    PUT(C_WIRE, int32_t, d->wire_len);
    PUT(C_L4, int16_t, d->l4_offset);
    PUT(C_SPORT, int32_t, d->sport);
    PUT(C_DPORT, int32_t, d->dport);
    PUT(C_FLAGS, int16_t, d->tcp_flags);
    PUT(C_ICMP_TYPE, int16_t, d->icmp_type);
    PUT(C_ICMP_CODE, int16_t, d->icmp_code);
#undef PUT
    COL(c, C_TRUNC, uint8_t)[i] = ok && d->truncated;
    /* addresses as IPv4-mapped IPv6 halves, 0 when not received */
    uint64_t hi = 0, lo = 0;
    bool src_ok = ok && d->src_ok, dst_ok = ok && d->dst_ok;
    if (src_ok) {
        if (d->v4_addr) { hi = 0; lo = 0xFFFF00000000ULL | (uint64_t)U32(d->src); }
        else { hi = be64(d->src); lo = be64(d->src + 8); }
    }
    COL(c, C_SRC_HI, uint64_t)[i] = hi;
    COL(c, C_SRC_LO, uint64_t)[i] = lo;
    COL(c, C_SRC_OK, uint8_t)[i] = src_ok;
    hi = lo = 0;
    if (dst_ok) {
        if (d->v4_addr) { hi = 0; lo = 0xFFFF00000000ULL | (uint64_t)U32(d->dst); }
        else { hi = be64(d->dst); lo = be64(d->dst + 8); }
    }
    COL(c, C_DST_HI, uint64_t)[i] = hi;
    COL(c, C_DST_LO, uint64_t)[i] = lo;
    COL(c, C_DST_OK, uint8_t)[i] = dst_ok;
}

/* decode(buf, lengths, present, port, columns, fallback) -> rows left to the reference
 *
 * buf: 2-D uint8 (rows may be strided, bytes within a row contiguous); lengths, present:
 * int64 (present may be None: min(length, width)); fallback: uint8, set to 1 for each row this
 * code does not decode (odd lengths), whose columns are left at PacketBatch.empty's values. */
static PyObject *fast_decode(PyObject *self, PyObject *args) {
    PyObject *buf_obj, *len_obj, *present_obj, *cols_obj, *fb_obj;
    int port;
    if (!PyArg_ParseTuple(args, "OOOiOO", &buf_obj, &len_obj, &present_obj, &port, &cols_obj,
                          &fb_obj))
        return NULL;
    if (port != 4789 && port != 4790 && port != 6081) {
        PyErr_Format(PyExc_ValueError, "no mirror encapsulation on UDP port %d", port);
        return NULL;
    }
    Py_buffer buf, lens, pres, fb;
    memset(&pres, 0, sizeof pres);
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_STRIDED_RO) < 0) return NULL;
    PyObject *result = NULL;
    bool have_lens = false, have_pres = false, have_fb = false;
    Columns cols = {.held = 0};
    if (buf.ndim != 2 || buf.itemsize != 1 || buf.strides[1] != 1) {
        PyErr_SetString(PyExc_ValueError, "buf must be 2-D uint8 with contiguous rows");
        goto done;
    }
    Py_ssize_t n = buf.shape[0], width = buf.shape[1], stride = buf.strides[0];
    if (PyObject_GetBuffer(len_obj, &lens, PyBUF_C_CONTIGUOUS) < 0) goto done;
    have_lens = true;
    if (lens.len != n * 8) { PyErr_SetString(PyExc_ValueError, "lengths: int64, one per row"); goto done; }
    if (present_obj != Py_None) {
        if (PyObject_GetBuffer(present_obj, &pres, PyBUF_C_CONTIGUOUS) < 0) goto done;
        have_pres = true;
        if (pres.len != n * 8) { PyErr_SetString(PyExc_ValueError, "present: int64, one per row"); goto done; }
    }
    if (PyObject_GetBuffer(fb_obj, &fb, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    have_fb = true;
    if (fb.len != n) { PyErr_SetString(PyExc_ValueError, "fallback: uint8, one per row"); goto done; }
    if (columns_get(&cols, cols_obj, n, true) < 0) goto done;
    const int64_t *length = lens.buf;
    const int64_t *present = have_pres ? pres.buf : NULL;
    uint8_t *fallback = fb.buf;
    Py_ssize_t left = 0;
    Dec d;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t len = length[i];
        int64_t end = len < width ? len : width;
        if (present && present[i] < end) end = present[i];
        /* Python slicing semantics of negative cuts, and lengths past the int32 columns:
         * the reference decides those */
        if (end < 0 || len > 0x7FFFFFF0LL) {
            fallback[i] = 1;
            left++;
            dec_init(&d);
            store_row(&cols, i, -1, &d);
            COL(&cols, C_REASON, uint8_t)[i] = 0;
            continue;
        }
        fallback[i] = 0;
        const uint8_t *row = (const uint8_t *)buf.buf + i * stride;
        int reason = decode_one(row, (Py_ssize_t)end, len, port, &d);
        store_row(&cols, i, reason, &d);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(left);
done:
    columns_release(&cols);
    if (have_fb) PyBuffer_Release(&fb);
    if (have_pres) PyBuffer_Release(&pres);
    if (have_lens) PyBuffer_Release(&lens);
    PyBuffer_Release(&buf);
    return result;
}

/* ============================================================================================
 * Flow table
 * ========================================================================================== */

#define NIL 0xFFFFFFFFu
#define CHUNK_BITS 12
#define CHUNK (1u << CHUNK_BITS)

enum { END_IDLE, END_ACTIVE, END_FIN, END_RST, END_EVICTED, END_SHUTDOWN, END_FLUSH, N_END };

/* (vni, vlan, inner_vlan, ethertype, ip_version, protocol, addr_a, port_a, addr_b, port_b);
 * -1 is None; addresses are 16 bytes (IPv4 mapped: for IPv4 flows both sides are, so bytes
 * order as the 4-byte Python values do), absent ones zero with their `ok` bit clear. */
typedef struct {
    uint8_t a[16], b[16];
    int32_t vni, ethertype, port_a, port_b;
    int16_t vlan, inner, proto;
    int8_t version;
    uint8_t ok; /* bit 0: a present, bit 1: b present */
} Key;

typedef struct {
    int64_t first_ns; /* valid when packets > 0 */
    uint64_t packets, bytes, captured, truncated;
} Side;

/* state bits */
#define SYN_A 0x01
#define SYN_B 0x02
#define FIN_A 0x04
#define FIN_B 0x08
#define END_SHIFT 4 /* 0: open, 1 + END_FIN or 1 + END_RST */
/* orient: which endpoint initiated, fixed by the first interim export (checkpoint) so that
 * later pieces, whoever speaks in them, keep the same src and dst */
#define ORIENT_A 1
#define ORIENT_B 2

typedef struct {
    Key key;                          /* 56 */
    uint32_t prev, next, heap_pos, gen; /* LRU list (free list: next), heap slot, generation */
    uint16_t flags[2];
    uint8_t state, orient, pad[2]; /* orient: ORIENT_A/ORIENT_B once a piece was exported */
    int64_t last_ns, deadline;
    Side side[2];
} Flow; /* 176 bytes */

typedef struct {
    uint8_t src[16], dst[16];
    int64_t ip_id;
    int32_t vni;
    int16_t vlan, proto;
    int8_t version;
    uint8_t pad[7];
} FragKey; /* 56 */

typedef struct {
    FragKey key;
    int32_t sport, dport;
    int64_t ts;
    uint32_t prev, next;
} Frag;

typedef struct {
    uint8_t src[16], dst[16];
    int32_t vni, ethertype, sport, dport;
    int16_t vlan, inner, proto;
    int8_t version;
    uint8_t ok; /* bit 0: src present, bit 1: dst present */
    int64_t first_ns, last_ns;
    uint64_t fwd[4], rev[4]; /* packets, bytes, captured, truncated */
    uint16_t fwd_flags, rev_flags;
    uint8_t reason;
} Row;

/* an open-addressing index of uint32 ids (slot = id + 1, 0 empty), linear probing,
 * backward-shift deletion; the keys live in the records */
typedef struct {
    uint32_t *slots;
    size_t mask, count;
} Index;

typedef struct {
    PyObject_HEAD
    int64_t idle_ns, active_ns, linger_ns, fragment_ns;
    uint64_t max_flows, max_fragments;
    /* flows */
    Flow **chunks;
    size_t nchunks, high; /* records ever allocated */
    uint32_t free_head, lru_head, lru_tail;
    size_t active;
    Index index;
    uint32_t *heap;
    size_t heap_n, heap_cap;
    uint32_t generation;
    /* fragments */
    Frag *frags;
    size_t frag_cap, frag_high;
    uint32_t frag_free, frag_head, frag_tail;
    Index frag_index;
    /* ended flows not yet taken */
    Row *rows;
    size_t nrows, rows_cap;
    uint64_t packets;
    uint64_t exported[N_END];
} Table;

#define FLOW(t, id) (&(t)->chunks[(id) >> CHUNK_BITS][(id) & (CHUNK - 1)])

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb3fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_words(const void *p, size_t bytes) {
    const uint8_t *b = p;
    uint64_t h = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < bytes; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h = (h ^ w) * 0x100000001B3ULL;
        h = (h << 29) | (h >> 35);
    }
    return mix64(h);
}

static inline uint64_t key_hash(const Key *k) { return hash_words(k, sizeof(Key)); }
static inline uint64_t frag_hash(const FragKey *k) { return hash_words(k, sizeof(FragKey)); }

/* The index and the heap grow by doubling: mapped apart from malloc's heap, so that the
 * arrays they outgrow go back to the system instead of staying in the process (issue 6
 * counts memory per flow by RSS). */
static void *big_alloc(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p; /* zero-filled */
}

static void big_free(void *p, size_t bytes) {
    if (p) munmap(p, bytes);
}

static int index_init(Index *ix, size_t slots) {
    ix->slots = big_alloc(slots * sizeof(uint32_t));
    if (!ix->slots) return -1;
    ix->mask = slots - 1;
    ix->count = 0;
    return 0;
}

static void index_clear(Index *ix) {
    memset(ix->slots, 0, (ix->mask + 1) * sizeof(uint32_t));
    ix->count = 0;
}

static uint64_t table_hash_of(Table *t, uint32_t id, bool frag) {
    return frag ? frag_hash(&t->frags[id].key) : key_hash(&FLOW(t, id)->key);
}

/* remove the id at slot i (backward shift) */
static void index_remove_slot(Table *t, Index *ix, size_t i, bool frag) {
    size_t j = i;
    for (;;) {
        j = (j + 1) & ix->mask;
        uint32_t s = ix->slots[j];
        if (!s) break;
        size_t k = table_hash_of(t, s - 1, frag) & ix->mask;
        /* move s back to i unless its home k lies cyclically in (i, j] */
        bool stays = (i <= j) ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            ix->slots[i] = s;
            i = j;
        }
    }
    ix->slots[i] = 0;
    ix->count--;
}

static int index_grow(Table *t, Index *ix, bool frag) {
    size_t slots = (ix->mask + 1) * 2;
    uint32_t *old = ix->slots;
    size_t old_n = ix->mask + 1;
    uint32_t *fresh = big_alloc(slots * sizeof(uint32_t));
    if (!fresh) return -1;
    ix->slots = fresh;
    ix->mask = slots - 1;
    for (size_t i = 0; i < old_n; i++) {
        uint32_t s = old[i];
        if (!s) continue;
        size_t k = table_hash_of(t, s - 1, frag) & ix->mask;
        while (fresh[k]) k = (k + 1) & ix->mask;
        fresh[k] = s;
    }
    big_free(old, old_n * sizeof(uint32_t));
    return 0;
}

/* ---- flows: LRU list, heap of active deadlines ---- */

static void lru_unlink(Table *t, uint32_t id) {
    Flow *f = FLOW(t, id);
    if (f->prev != NIL) FLOW(t, f->prev)->next = f->next; else t->lru_head = f->next;
    if (f->next != NIL) FLOW(t, f->next)->prev = f->prev; else t->lru_tail = f->prev;
}

static void lru_append(Table *t, uint32_t id) {
    Flow *f = FLOW(t, id);
    f->prev = t->lru_tail;
    f->next = NIL;
    if (t->lru_tail != NIL) FLOW(t, t->lru_tail)->next = id; else t->lru_head = id;
    t->lru_tail = id;
}

/* Python orders its heap by (deadline, generation); generations are compared as serial
 * numbers, exact while the flows compared were started fewer than 2^31 flows apart. */
static inline bool heap_less(Table *t, uint32_t x, uint32_t y) {
    Flow *a = FLOW(t, x), *b = FLOW(t, y);
    if (a->deadline != b->deadline) return a->deadline < b->deadline;
    return (int32_t)(a->gen - b->gen) < 0;
}

static void heap_set(Table *t, size_t pos, uint32_t id) {
    t->heap[pos] = id;
    FLOW(t, id)->heap_pos = (uint32_t)pos;
}

static void heap_up(Table *t, size_t pos) {
    uint32_t id = t->heap[pos];
    while (pos > 0) {
        size_t parent = (pos - 1) / 2;
        if (!heap_less(t, id, t->heap[parent])) break;
        heap_set(t, pos, t->heap[parent]);
        pos = parent;
    }
    heap_set(t, pos, id);
}

static void heap_down(Table *t, size_t pos) {
    uint32_t id = t->heap[pos];
    for (;;) {
        size_t child = 2 * pos + 1;
        if (child >= t->heap_n) break;
        if (child + 1 < t->heap_n && heap_less(t, t->heap[child + 1], t->heap[child])) child++;
        if (!heap_less(t, t->heap[child], id)) break;
        heap_set(t, pos, t->heap[child]);
        pos = child;
    }
    heap_set(t, pos, id);
}

static void heap_remove(Table *t, uint32_t id) {
    size_t pos = FLOW(t, id)->heap_pos;
    t->heap_n--;
    if (pos == t->heap_n) return;
    uint32_t moved = t->heap[t->heap_n];
    heap_set(t, pos, moved);
    heap_up(t, pos);
    heap_down(t, FLOW(t, moved)->heap_pos);
}

static int rows_reserve(Table *t) {
    if (t->nrows < t->rows_cap) return 0;
    size_t cap = t->rows_cap ? t->rows_cap * 2 : 256;
    Row *r = realloc(t->rows, cap * sizeof(Row));
    if (!r) return -1;
    t->rows = r;
    t->rows_cap = cap;
    return 0;
}

/* Flow.initiator_is_a */
static bool initiator_is_a(const Flow *f) {
    if (f->state & SYN_A) return true;
    if (f->state & SYN_B) return false;
    if (f->orient) return f->orient == ORIENT_A;
    if (f->side[1].packets == 0) return true;
    if (f->side[0].packets == 0) return false;
    return f->side[0].first_ns <= f->side[1].first_ns;
}

static int flow_reason(const Flow *f, int reason) {
    int closed = f->state >> END_SHIFT;
    return closed ? closed - 1 : reason;
}

/* _export: append the row of the flow's current piece (what it counted since it started or
 * since the last checkpoint); a piece without packets (everything was exported by a
 * checkpoint) has no row */
static int flow_row(Table *t, const Flow *f, int reason, bool counted) {
    if (f->side[0].packets == 0 && f->side[1].packets == 0) return 0;
    if (rows_reserve(t) < 0) return -1;
    Row *r = &t->rows[t->nrows++];
    bool a_first = initiator_is_a(f);
    const Side *fwd = &f->side[a_first ? 0 : 1], *rev = &f->side[a_first ? 1 : 0];
    const Key *k = &f->key;
    if (a_first) {
        memcpy(r->src, k->a, 16); memcpy(r->dst, k->b, 16);
        r->sport = k->port_a; r->dport = k->port_b;
        r->ok = k->ok;
    } else {
        memcpy(r->src, k->b, 16); memcpy(r->dst, k->a, 16);
        r->sport = k->port_b; r->dport = k->port_a;
        r->ok = (uint8_t)(((k->ok & 1) << 1) | ((k->ok >> 1) & 1));
    }
    r->vni = k->vni; r->ethertype = k->ethertype; r->vlan = k->vlan; r->inner = k->inner;
    r->proto = k->proto; r->version = k->version;
    int64_t first = f->side[0].packets ? f->side[0].first_ns : f->side[1].first_ns;
    if (f->side[1].packets && f->side[1].first_ns < first) first = f->side[1].first_ns;
    r->first_ns = first;
    r->last_ns = f->last_ns;
    r->fwd[0] = fwd->packets; r->fwd[1] = fwd->bytes; r->fwd[2] = fwd->captured; r->fwd[3] = fwd->truncated;
    r->rev[0] = rev->packets; r->rev[1] = rev->bytes; r->rev[2] = rev->captured; r->rev[3] = rev->truncated;
    r->fwd_flags = f->flags[a_first ? 0 : 1];
    r->rev_flags = f->flags[a_first ? 1 : 0];
    r->reason = (uint8_t)reason;
    if (counted) t->exported[reason]++;
    return 0;
}

/* _end: remove the flow, append the row of its last piece */
static int flow_end(Table *t, uint32_t id, int reason) {
    Flow *f = FLOW(t, id);
    if (flow_row(t, f, reason, true) < 0) return -1;
    /* find its index slot */
    size_t i = key_hash(&f->key) & t->index.mask;
    while (t->index.slots[i] != id + 1) i = (i + 1) & t->index.mask;
    index_remove_slot(t, &t->index, i, false);
    lru_unlink(t, id);
    heap_remove(t, id);
    /* free the record */
    f->next = t->free_head;
    t->free_head = id;
    t->active--;
    return 0;
}

static int64_t table_find(Table *t, const Key *k, uint64_t h) {
    size_t i = h & t->index.mask;
    for (;;) {
        uint32_t s = t->index.slots[i];
        if (!s) return -1;
        if (memcmp(&FLOW(t, s - 1)->key, k, sizeof(Key)) == 0) return s - 1;
        i = (i + 1) & t->index.mask;
    }
}

static int64_t flow_alloc(Table *t) {
    if (t->free_head != NIL) {
        uint32_t id = t->free_head;
        t->free_head = FLOW(t, id)->next;
        return id;
    }
    if (t->high >= (size_t)NIL - 1) return -1;
    if ((t->high >> CHUNK_BITS) >= t->nchunks) {
        Flow **chunks = realloc(t->chunks, (t->nchunks + 1) * sizeof(Flow *));
        if (!chunks) return -1;
        t->chunks = chunks;
        chunks[t->nchunks] = malloc(CHUNK * sizeof(Flow));
        if (!chunks[t->nchunks]) return -1;
        t->nchunks++;
    }
    return (int64_t)t->high++;
}

/* _start: evict the least recently seen flows past max_flows, then a new flow */
static int64_t flow_start(Table *t, const Key *k, uint64_t h, int64_t ts) {
    while (t->active >= t->max_flows) {
        if (flow_end(t, t->lru_head, END_EVICTED) < 0) return -1;
    }
    if ((t->index.count + 1) * 2 > t->index.mask + 1) {
        if (index_grow(t, &t->index, false) < 0) return -1;
    }
    if (t->heap_n >= t->heap_cap) {
        size_t cap = t->heap_cap ? t->heap_cap * 2 : 1024;
        uint32_t *heap = big_alloc(cap * sizeof(uint32_t));
        if (!heap) return -1;
        if (t->heap_n) memcpy(heap, t->heap, t->heap_n * sizeof(uint32_t));
        big_free(t->heap, t->heap_cap * sizeof(uint32_t));
        t->heap = heap;
        t->heap_cap = cap;
    }
    int64_t got = flow_alloc(t);
    if (got < 0) return -1;
    uint32_t id = (uint32_t)got;
    Flow *f = FLOW(t, id);
    memset(f, 0, sizeof *f);
    f->key = *k;
    f->last_ns = ts;
    f->deadline = ts + t->active_ns;
    f->gen = ++t->generation;
    size_t i = h & t->index.mask;
    while (t->index.slots[i]) i = (i + 1) & t->index.mask;
    t->index.slots[i] = id + 1;
    t->index.count++;
    lru_append(t, id);
    t->heap[t->heap_n] = id;
    f->heap_pos = (uint32_t)t->heap_n;
    t->heap_n++;
    heap_up(t, t->heap_n - 1);
    t->active++;
    return id;
}

/* _ended_by: -1 when the flow goes on */
static int ended_by(Table *t, const Flow *f, int64_t ts) {
    int64_t quiet = ts - f->last_ns;
    int closed = f->state >> END_SHIFT;
    if (closed) return quiet >= t->linger_ns ? closed - 1 : -1;
    if (quiet >= t->idle_ns) return END_IDLE;
    if (f->side[0].packets == 0 && f->side[1].packets == 0) return -1; /* checkpointed */
    int64_t first = f->side[0].packets ? f->side[0].first_ns : f->side[1].first_ns;
    if (f->side[1].packets && f->side[1].first_ns < first) first = f->side[1].first_ns;
    if (ts - first >= t->active_ns) return END_ACTIVE;
    return -1;
}

/* ---- fragments ---- */

static void frag_unlink(Table *t, uint32_t id) {
    Frag *f = &t->frags[id];
    if (f->prev != NIL) t->frags[f->prev].next = f->next; else t->frag_head = f->next;
    if (f->next != NIL) t->frags[f->next].prev = f->prev; else t->frag_tail = f->prev;
}

static void frag_append(Table *t, uint32_t id) {
    Frag *f = &t->frags[id];
    f->prev = t->frag_tail;
    f->next = NIL;
    if (t->frag_tail != NIL) t->frags[t->frag_tail].next = id; else t->frag_head = id;
    t->frag_tail = id;
}

static int64_t frag_find(Table *t, const FragKey *k, uint64_t h) {
    size_t i = h & t->frag_index.mask;
    for (;;) {
        uint32_t s = t->frag_index.slots[i];
        if (!s) return -1;
        if (memcmp(&t->frags[s - 1].key, k, sizeof(FragKey)) == 0) return s - 1;
        i = (i + 1) & t->frag_index.mask;
    }
}

static void frag_remove(Table *t, uint32_t id) {
    size_t i = frag_hash(&t->frags[id].key) & t->frag_index.mask;
    while (t->frag_index.slots[i] != id + 1) i = (i + 1) & t->frag_index.mask;
    index_remove_slot(t, &t->frag_index, i, true);
    frag_unlink(t, id);
    t->frags[id].next = t->frag_free;
    t->frag_free = id;
}

static int frag_remember(Table *t, const FragKey *k, int32_t sport, int32_t dport, int64_t ts) {
    uint64_t h = frag_hash(k);
    int64_t found = frag_find(t, k, h);
    uint32_t id;
    if (found >= 0) {
        id = (uint32_t)found;
        frag_unlink(t, id);
    } else {
        if ((t->frag_index.count + 1) * 2 > t->frag_index.mask + 1) {
            if (index_grow(t, &t->frag_index, true) < 0) return -1;
        }
        if (t->frag_free != NIL) {
            id = t->frag_free;
            t->frag_free = t->frags[id].next;
        } else {
            if (t->frag_high >= t->frag_cap) {
                size_t cap = t->frag_cap ? t->frag_cap * 2 : 64;
                Frag *frags = realloc(t->frags, cap * sizeof(Frag));
                if (!frags) return -1;
                t->frags = frags;
                t->frag_cap = cap;
            }
            id = (uint32_t)t->frag_high++;
        }
        t->frags[id].key = *k;
        size_t i = h & t->frag_index.mask;
        while (t->frag_index.slots[i]) i = (i + 1) & t->frag_index.mask;
        t->frag_index.slots[i] = id + 1;
        t->frag_index.count++;
    }
    t->frags[id].sport = sport;
    t->frags[id].dport = dport;
    t->frags[id].ts = ts;
    frag_append(t, id);
    while (t->frag_index.count > t->max_fragments) frag_remove(t, t->frag_head);
    return 0;
}

static void frag_clear(Table *t) {
    index_clear(&t->frag_index);
    t->frag_high = 0;
    t->frag_free = t->frag_head = t->frag_tail = NIL;
}

/* ---- metering ---- */

static const int16_t *icmp_counterparts(int version) {
    static int16_t v4[256], v6[256];
    static bool ready = false;
    if (!ready) {
        for (int i = 0; i < 256; i++) v4[i] = v6[i] = -1;
        /* collector/flows/community_id.py ICMP4_COUNTERPART, ICMP6_COUNTERPART */
        static const int p4[][2] = {{8, 0}, {0, 8}, {13, 14}, {14, 13}, {15, 16}, {16, 15},
                                    {10, 9}, {9, 10}, {17, 18}, {18, 17}};
        static const int p6[][2] = {{128, 129}, {129, 128}, {130, 131}, {131, 130},
                                    {133, 134}, {134, 133}, {135, 136}, {136, 135},
                                    {139, 140}, {140, 139}, {144, 145}, {145, 144}};
        for (size_t i = 0; i < sizeof p4 / sizeof p4[0]; i++) v4[p4[i][0]] = (int16_t)p4[i][1];
        for (size_t i = 0; i < sizeof p6 / sizeof p6[0]; i++) v6[p6[i][0]] = (int16_t)p6[i][1];
        ready = true;
    }
    return version == 6 ? v6 : v4;
}

static inline void put_addr(uint8_t out[16], uint64_t hi, uint64_t lo, int version) {
    if (version == 4) { /* the Python key holds the 4 low bytes only */
        hi = 0;
        lo = 0xFFFF00000000ULL | (lo & 0xFFFFFFFFULL);
    }
    hi = __builtin_bswap64(hi);
    lo = __builtin_bswap64(lo);
    memcpy(out, &hi, 8);
    memcpy(out + 8, &lo, 8);
}

static inline int64_t opt(int64_t v) { return v < 0 ? -1 : v; }

/* the values _meter takes for one decoded row (collector/flows/table.py _batch_columns) */
typedef struct {
    int64_t ts, vni, vlan, inner, ethertype, version, proto, sport, dport, wire_len,
        captured_len, l3_offset, flags, frag_offset, more, ip_id;
    uint8_t src[16], dst[16];
    bool src_ok, dst_ok, truncated;
} In;

typedef struct {
    const int64_t *ts, *ip_id;
    const int32_t *vni, *ethertype, *sport, *dport, *wire, *captured, *frag;
    const int16_t *vlan, *inner, *proto, *l3, *itype, *icode, *flags;
    const int8_t *vlan_count, *ipv, *more;
    const uint64_t *src_hi, *src_lo, *dst_hi, *dst_lo;
    const uint8_t *reason, *src_ok, *dst_ok, *trunc;
} Cols;

static inline void row_inputs(const Cols *c, Py_ssize_t i, In *x) {
    x->ts = c->ts[i];
    x->version = opt(c->ipv[i]);
    x->proto = opt(c->proto[i]);
    x->sport = opt(c->sport[i]);
    x->dport = opt(c->dport[i]);
    if (x->proto == 1 || x->proto == 58) { /* icmp_ports */
        int64_t type = opt(c->itype[i]);
        if (type < 0) {
            x->sport = x->dport = -1;
        } else {
            int16_t pair = type < 256 ? icmp_counterparts((int)x->version)[type] : -1;
            x->sport = type;
            x->dport = pair >= 0 ? pair : opt(c->icode[i]);
        }
    }
    x->src_ok = c->src_ok[i] != 0;
    x->dst_ok = c->dst_ok[i] != 0;
    if (x->src_ok) put_addr(x->src, c->src_hi[i], c->src_lo[i], (int)x->version);
    else memset(x->src, 0, 16);
    if (x->dst_ok) put_addr(x->dst, c->dst_hi[i], c->dst_lo[i], (int)x->version);
    else memset(x->dst, 0, 16);
    x->vni = opt(c->vni[i]);
    x->vlan = c->vlan_count[i] >= 1 ? c->vlan[i] : -1;
    x->inner = c->vlan_count[i] >= 2 ? c->inner[i] : -1;
    x->ethertype = opt(c->ethertype[i]);
    x->wire_len = opt(c->wire[i]);
    x->captured_len = c->captured[i];
    x->l3_offset = opt(c->l3[i]);
    x->truncated = c->trunc[i] != 0;
    x->flags = opt(c->flags[i]);
    x->frag_offset = opt(c->frag[i]);
    x->more = c->more[i] < 0 ? -1 : c->more[i] != 0;
    x->ip_id = opt(c->ip_id[i]);
}

/* the flow key of a row and which endpoint sent it; returns the key's hash */
static inline uint64_t row_key(const In *x, Key *k, bool *from_a) {
    /* unknown fields sort first, so a copy without addresses is one endpoint */
    int cmp;
    if (x->src_ok != x->dst_ok) cmp = x->src_ok ? 1 : -1;
    else cmp = x->src_ok ? memcmp(x->src, x->dst, 16) : 0;
    if (cmp == 0) cmp = (x->sport > x->dport) - (x->sport < x->dport);
    bool a = cmp <= 0;
    *from_a = a;
    memcpy(k->a, a ? x->src : x->dst, 16); /* absent addresses are zeros */
    memcpy(k->b, a ? x->dst : x->src, 16);
    k->vni = (int32_t)x->vni;
    k->ethertype = (int32_t)x->ethertype;
    k->port_a = (int32_t)(a ? x->sport : x->dport);
    k->port_b = (int32_t)(a ? x->dport : x->sport);
    k->vlan = (int16_t)x->vlan;
    k->inner = (int16_t)x->inner;
    k->proto = (int16_t)x->proto;
    k->version = (int8_t)x->version;
    bool oka = a ? x->src_ok : x->dst_ok, okb = a ? x->dst_ok : x->src_ok;
    k->ok = (uint8_t)(oka | (okb << 1));
    return key_hash(k);
}

static int meter_flow(Table *t, const Key *kp, uint64_t h, bool from_a, int64_t ts,
                      int64_t proto, int64_t ip_bytes, int64_t captured_len, bool truncated,
                      int64_t flags);

/* _meter for one decoded row */
static int meter(Table *t, In *x) {
    t->packets++;
    int64_t ts = x->ts;
    if (x->frag_offset > 0 || x->more == 1) {
        FragKey fk;
        memset(&fk, 0, sizeof fk);
        memcpy(fk.src, x->src, 16);
        memcpy(fk.dst, x->dst, 16);
        fk.ip_id = x->ip_id;
        fk.vni = (int32_t)x->vni;
        fk.vlan = (int16_t)x->vlan;
        fk.proto = (int16_t)x->proto;
        fk.version = (int8_t)x->version;
        if (x->frag_offset > 0) { /* a later fragment: its ports are those of the first, if seen */
            if (x->src_ok && x->dst_ok) {
                int64_t id = frag_find(t, &fk, frag_hash(&fk));
                if (id >= 0 && ts - t->frags[id].ts <= t->fragment_ns) {
                    x->sport = t->frags[id].sport;
                    x->dport = t->frags[id].dport;
                }
            }
        } else if (x->src_ok && x->dst_ok) {
            if (frag_remember(t, &fk, (int32_t)x->sport, (int32_t)x->dport, ts) < 0) return -1;
        }
    }
    Key k;
    bool from_a;
    uint64_t h = row_key(x, &k, &from_a);
    int64_t ip_bytes;
    if (x->wire_len >= 0) ip_bytes = x->wire_len;
    else if (x->l3_offset >= 0)
        ip_bytes = x->captured_len - x->l3_offset > 0 ? x->captured_len - x->l3_offset : 0;
    else ip_bytes = x->captured_len;
    return meter_flow(t, &k, h, from_a, ts, x->proto, ip_bytes, x->captured_len, x->truncated,
                      x->flags);
}

/* the rest of _meter, once the key is known */
static int meter_flow(Table *t, const Key *kp, uint64_t h, bool from_a, int64_t ts,
                      int64_t proto, int64_t ip_bytes, int64_t captured_len, bool truncated,
                      int64_t flags) {
    int64_t id = table_find(t, kp, h);
    if (id >= 0) {
        /* The flow may have ended before this packet, whatever the clock ticks said. */
        int reason = ended_by(t, FLOW(t, id), ts);
        if (reason >= 0) {
            if (flow_end(t, (uint32_t)id, reason) < 0) return -1;
            id = -1;
        } else if (t->lru_tail != (uint32_t)id) {
            lru_unlink(t, (uint32_t)id);
            lru_append(t, (uint32_t)id);
        }
    }
    if (id < 0) {
        id = flow_start(t, kp, h, ts);
        if (id < 0) return -1;
    }
    Flow *f = FLOW(t, id);
    Side *s = &f->side[from_a ? 0 : 1];
    if (s->packets == 0 || ts < s->first_ns) s->first_ns = ts;
    s->packets++;
    s->bytes += (uint64_t)ip_bytes;
    s->captured += (uint64_t)captured_len;
    s->truncated += truncated;
    if (ts > f->last_ns) f->last_ns = ts;
    if (flags >= 0 && proto == 6) {
        f->flags[from_a ? 0 : 1] |= (uint16_t)flags;
        /* _tcp_state */
        if ((flags & 0x02) && !(flags & 0x10) && !(f->state & (SYN_A | SYN_B)))
            f->state |= from_a ? SYN_A : SYN_B;
        if (flags & 0x04) {
            if (!(f->state >> END_SHIFT)) f->state |= (uint8_t)((1 + END_RST) << END_SHIFT);
        } else if (flags & 0x01) {
            f->state |= from_a ? FIN_A : FIN_B;
            if ((f->state & FIN_A) && (f->state & FIN_B) && !(f->state >> END_SHIFT))
                f->state |= (uint8_t)((1 + END_FIN) << END_SHIFT);
        }
    }
    return 0;
}

/* Rows ahead of the one metered whose index slot / flow record are fetched: a packet's flow
 * record is a cache miss at table sizes past the caches, and prefetching hides most of it. */
#define AHEAD_SLOT 12
#define AHEAD_RECORD 6

/* add_batch(columns, ts) -> flows ended (rows waiting in take()) */
static PyObject *table_add_batch(Table *t, PyObject *args) {
    PyObject *cols_obj, *ts_obj;
    if (!PyArg_ParseTuple(args, "OO", &cols_obj, &ts_obj)) return NULL;
    Py_buffer tsb;
    if (PyObject_GetBuffer(ts_obj, &tsb, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = tsb.len / 8;
    Columns c;
    if (tsb.len % 8 || columns_get(&c, cols_obj, n, false) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "ts: int64, one per row");
        PyBuffer_Release(&tsb);
        return NULL;
    }
    Cols v = {
        .ts = tsb.buf, .ip_id = COL(&c, C_IPID, int64_t), .vni = COL(&c, C_VNI, int32_t),
        .ethertype = COL(&c, C_ETHERTYPE, int32_t), .sport = COL(&c, C_SPORT, int32_t),
        .dport = COL(&c, C_DPORT, int32_t), .wire = COL(&c, C_WIRE, int32_t),
        .captured = COL(&c, C_CAPTURED, int32_t), .frag = COL(&c, C_FRAG, int32_t),
        .vlan = COL(&c, C_VLAN, int16_t), .inner = COL(&c, C_INNER_VLAN, int16_t),
        .proto = COL(&c, C_PROTO, int16_t), .l3 = COL(&c, C_L3, int16_t),
        .itype = COL(&c, C_ICMP_TYPE, int16_t), .icode = COL(&c, C_ICMP_CODE, int16_t),
        .flags = COL(&c, C_FLAGS, int16_t), .vlan_count = COL(&c, C_VLAN_COUNT, int8_t),
        .ipv = COL(&c, C_IPV, int8_t), .more = COL(&c, C_MORE, int8_t),
        .src_hi = COL(&c, C_SRC_HI, uint64_t), .src_lo = COL(&c, C_SRC_LO, uint64_t),
        .dst_hi = COL(&c, C_DST_HI, uint64_t), .dst_lo = COL(&c, C_DST_LO, uint64_t),
        .reason = COL(&c, C_REASON, uint8_t), .src_ok = COL(&c, C_SRC_OK, uint8_t),
        .dst_ok = COL(&c, C_DST_OK, uint8_t), .trunc = COL(&c, C_TRUNC, uint8_t),
    };
    size_t before = t->nrows;
    int failed = 0;
    /* the decoded rows and the hashes of their keys (as if no fragment changes their ports:
     * only used to prefetch) */
    Py_ssize_t m = 0;
    size_t cap = (size_t)(n ? n : 1);
    Py_ssize_t *rows = malloc(cap * sizeof(Py_ssize_t));
    uint64_t *hashes = malloc(cap * sizeof(uint64_t));
    Key *keys = malloc(cap * sizeof(Key));
    uint8_t *sides = malloc(cap);
    if (!rows || !hashes || !keys || !sides) {
        failed = 1;
    } else {
        In x;
        bool from_a;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (v.reason[i]) continue;
            row_inputs(&v, i, &x);
            rows[m] = i;
            hashes[m] = row_key(&x, &keys[m], &from_a);
            sides[m++] = from_a;
        }
        for (Py_ssize_t j = 0; j < m && !failed; j++) {
            if (j + AHEAD_SLOT < m) __builtin_prefetch(&t->index.slots[hashes[j + AHEAD_SLOT] & t->index.mask]);
            if (j + AHEAD_RECORD < m) {
                uint32_t slot = t->index.slots[hashes[j + AHEAD_RECORD] & t->index.mask];
                if (slot) {
                    const char *record = (const char *)FLOW(t, slot - 1);
                    __builtin_prefetch(record, 1);
                    __builtin_prefetch(record + 64, 1);
                    __builtin_prefetch(record + 128, 1);
                }
            }
            Py_ssize_t i = rows[j];
            if (v.frag[i] > 0 || v.more[i] == 1) { /* fragments may change the ports: all of _meter */
                row_inputs(&v, i, &x);
                failed = meter(t, &x) < 0;
                continue;
            }
            t->packets++;
            int64_t captured = v.captured[i], l3 = opt(v.l3[i]), wire = opt(v.wire[i]);
            int64_t ip_bytes = wire >= 0 ? wire : l3 >= 0 ? (captured - l3 > 0 ? captured - l3 : 0)
                                                          : captured;
            failed = meter_flow(t, &keys[j], hashes[j], sides[j], v.ts[i], opt(v.proto[i]),
                                ip_bytes, captured, v.trunc[i] != 0, opt(v.flags[i])) < 0;
        }
    }
    free(rows);
    free(hashes);
    free(keys);
    free(sides);
    columns_release(&c);
    PyBuffer_Release(&tsb);
    if (failed) return PyErr_NoMemory();
    return PyLong_FromSize_t(t->nrows - before);
}

static PyObject *table_expire(Table *t, PyObject *arg) {
    int64_t now = PyLong_AsLongLong(arg);
    if (now == -1 && PyErr_Occurred()) return NULL;
    size_t before = t->nrows;
    /* least recently seen first: stop at the first flow seen recently */
    int64_t quiet_enough = t->idle_ns < t->linger_ns ? t->idle_ns : t->linger_ns;
    uint32_t id = t->lru_head;
    while (id != NIL) {
        Flow *f = FLOW(t, id);
        uint32_t next = f->next;
        int64_t quiet = now - f->last_ns;
        if (quiet < quiet_enough) break;
        int closed = f->state >> END_SHIFT;
        int reason = -1;
        if (closed && quiet >= t->linger_ns) reason = closed - 1;
        else if (quiet >= t->idle_ns) reason = END_IDLE;
        if (reason >= 0 && flow_end(t, id, reason) < 0) return PyErr_NoMemory();
        id = next;
    }
    while (t->heap_n && FLOW(t, t->heap[0])->deadline <= now) {
        uint32_t top = t->heap[0];
        if (flow_end(t, top, flow_reason(FLOW(t, top), END_ACTIVE)) < 0) return PyErr_NoMemory();
    }
    int64_t horizon = now - t->fragment_ns;
    while (t->frag_head != NIL && t->frags[t->frag_head].ts < horizon) frag_remove(t, t->frag_head);
    return PyLong_FromSize_t(t->nrows - before);
}

/* checkpoint(): the interim export (FlowTable.checkpoint). Every flow with packets since it
 * started or since the last checkpoint gets a row of that piece ('active', or its close
 * reason), then counts from zero; the flow stays, with its TCP state and its orientation. */
static PyObject *table_checkpoint(Table *t, PyObject *unused) {
    size_t before = t->nrows;
    for (uint32_t id = t->lru_head; id != NIL; id = FLOW(t, id)->next) {
        Flow *f = FLOW(t, id);
        if (f->side[0].packets == 0 && f->side[1].packets == 0) continue;
        if (flow_row(t, f, flow_reason(f, END_ACTIVE), true) < 0) return PyErr_NoMemory();
        if (!f->orient) f->orient = initiator_is_a(f) ? ORIENT_A : ORIENT_B;
        memset(f->side, 0, sizeof f->side);
        f->flags[0] = f->flags[1] = 0;
    }
    return PyLong_FromSize_t(t->nrows - before);
}

/* an end reason code from Python: -1 with an exception when it is not one */
static long reason_arg(PyObject *arg) {
    long reason = PyLong_AsLong(arg);
    if (reason == -1 && PyErr_Occurred()) return -1;
    if (reason < 0 || reason >= N_END) {
        PyErr_Format(PyExc_ValueError, "reason %ld", reason);
        return -1;
    }
    return reason;
}

/* snapshot(reason_code): a row for every open flow's piece so far, the flows untouched and
 * not counted as exported: what the journal keeps so that a killed worker's successor can
 * write them (collector/store/journal.py) */
static PyObject *table_snapshot(Table *t, PyObject *arg) {
    long reason = reason_arg(arg);
    if (reason < 0) return NULL;
    size_t before = t->nrows;
    for (uint32_t id = t->lru_head; id != NIL; id = FLOW(t, id)->next) {
        const Flow *f = FLOW(t, id);
        if (flow_row(t, f, flow_reason(f, (int)reason), false) < 0) return PyErr_NoMemory();
    }
    return PyLong_FromSize_t(t->nrows - before);
}

static PyObject *table_drain(Table *t, PyObject *arg) {
    long reason = reason_arg(arg);
    if (reason < 0) return NULL;
    size_t before = t->nrows;
    while (t->lru_head != NIL) {
        uint32_t id = t->lru_head;
        if (flow_end(t, id, flow_reason(FLOW(t, id), (int)reason)) < 0) return PyErr_NoMemory();
    }
    frag_clear(t);
    return PyLong_FromSize_t(t->nrows - before);
}

/* ---- export: text of addresses, Community ID ---- */

typedef struct {
    char *data;
    size_t len, cap;
} Text;

static int text_put(Text *x, const char *s, size_t n) {
    if (x->len + n > x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 4096;
        while (cap < x->len + n) cap *= 2;
        char *d = realloc(x->data, cap);
        if (!d) return -1;
        x->data = d;
        x->cap = cap;
    }
    memcpy(x->data + x->len, s, n);
    x->len += n;
    return 0;
}

/* str(ipaddress.ip_address(addr)) as Python 3.11 writes it; IPv4-mapped IPv6 addresses,
 * which newer Pythons write differently, are redone by fast.py */
static size_t put_decimal(char *out, unsigned v) { /* 0..255 */
    size_t n = 0;
    if (v >= 100) out[n++] = (char)('0' + v / 100);
    if (v >= 10) out[n++] = (char)('0' + v / 10 % 10);
    out[n++] = (char)('0' + v % 10);
    return n;
}

static size_t put_hex(char *out, unsigned v) { /* 0..0xffff, no leading zeros */
    static const char digits[] = "0123456789abcdef";
    size_t n = 0;
    for (int shift = 12; shift > 0; shift -= 4)
        if (v >> shift) out[n++] = digits[(v >> shift) & 15];
    out[n++] = digits[v & 15];
    return n;
}

static size_t ip_text(char *out, const uint8_t a[16], int version) {
    if (version == 4) {
        size_t n = 0;
        for (int i = 12; i < 16; i++) {
            n += put_decimal(out + n, a[i]);
            if (i < 15) out[n++] = '.';
        }
        return n;
    }
    unsigned h[8];
    for (int i = 0; i < 8; i++) h[i] = ((unsigned)a[2 * i] << 8) | a[2 * i + 1];
    int best = -1, best_len = 0, run = -1, run_len = 0;
    for (int i = 0; i < 8; i++) {
        if (h[i] == 0) {
            if (run < 0) run = i;
            run_len++;
            if (run_len > best_len) { best_len = run_len; best = run; }
        } else {
            run = -1;
            run_len = 0;
        }
    }
    if (best_len < 2) best = -1;
    size_t n = 0;
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            out[n++] = ':';
            if (i == 0) out[n++] = ':';
            i += best_len - 1;
            continue;
        }
        n += put_hex(out + n, h[i]);
        if (i < 7) out[n++] = ':';
    }
    return n;
}

/* SHA-1 (FIPS 180-4), enough for Community ID's one short message */
static uint32_t rol(uint32_t v, int s) { return (v << s) | (v >> (32 - s)); }

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    uint8_t block[128];
    size_t padded = ((len + 8) / 64 + 1) * 64; /* len <= 47 here: one or two blocks */
    memset(block, 0, sizeof block);
    memcpy(block, msg, len);
    block[len] = 0x80;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) block[padded - 1 - i] = (uint8_t)(bits >> (8 * i));
    for (size_t at = 0; at < padded; at += 64) {
        uint32_t w[80];
        for (int i = 0; i < 16; i++)
            w[i] = ((uint32_t)block[at + 4 * i] << 24) | ((uint32_t)block[at + 4 * i + 1] << 16) |
                   ((uint32_t)block[at + 4 * i + 2] << 8) | block[at + 4 * i + 3];
        for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; i++) {
            uint32_t f, k;
            if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
            else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
            else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
            else { f = b ^ c ^ d; k = 0xCA62C1D6; }
            uint32_t tmp = rol(a, 5) + f + e + k + w[i];
            e = d; d = c; c = rol(b, 30); b = a; a = tmp;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
    }
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}

static size_t base64(const uint8_t *in, size_t len, char *out) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < len) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len) v |= in[i + 2];
        out[n++] = abc[(v >> 18) & 63];
        out[n++] = abc[(v >> 12) & 63];
        out[n++] = i + 1 < len ? abc[(v >> 6) & 63] : '=';
        out[n++] = i + 2 < len ? abc[v & 63] : '=';
    }
    return n;
}

/* community_id(): 0 when it is None */
static size_t community_id(const Row *r, char *out) {
    int proto = r->proto;
    if (proto < 0 || !(r->ok & 1) || !(r->ok & 2)) return 0;
    int alen = r->version == 4 ? 4 : 16;
    const uint8_t *src = alen == 4 ? r->src + 12 : r->src, *dst = alen == 4 ? r->dst + 12 : r->dst;
    uint8_t msg[2 + 32 + 6];
    size_t n = 0;
    msg[n++] = 0;
    msg[n++] = 0; /* seed 0 */
    bool ported = proto == 6 || proto == 17 || proto == 132 || proto == 1 || proto == 58;
    int64_t sport = r->sport, dport = r->dport;
    if (ported) {
        if (sport < 0 || dport < 0) return 0;
        bool one_way = false;
        if (proto == 1 || proto == 58)
            one_way = sport > 255 || icmp_counterparts(proto == 58 ? 6 : 4)[sport] < 0;
        if (!one_way) {
            int c = memcmp(src, dst, (size_t)alen);
            if (c > 0 || (c == 0 && sport > dport)) {
                const uint8_t *x = src; src = dst; dst = x;
                int64_t p = sport; sport = dport; dport = p;
            }
        }
        memcpy(msg + n, src, (size_t)alen); n += (size_t)alen;
        memcpy(msg + n, dst, (size_t)alen); n += (size_t)alen;
        msg[n++] = (uint8_t)proto;
        msg[n++] = 0;
        msg[n++] = (uint8_t)(sport >> 8); msg[n++] = (uint8_t)sport;
        msg[n++] = (uint8_t)(dport >> 8); msg[n++] = (uint8_t)dport;
    } else {
        if (memcmp(src, dst, (size_t)alen) > 0) { const uint8_t *x = src; src = dst; dst = x; }
        memcpy(msg + n, src, (size_t)alen); n += (size_t)alen;
        memcpy(msg + n, dst, (size_t)alen); n += (size_t)alen;
        msg[n++] = (uint8_t)proto;
        msg[n++] = 0;
    }
    uint8_t digest[20];
    sha1(msg, n, digest);
    out[0] = '1';
    out[1] = ':';
    return 2 + base64(digest, 20, out + 2);
}

static inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

#define NEW_COL(var, T) \
    PyObject *var##_obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * sizeof(T))); \
    if (!var##_obj) goto fail; \
    PyTuple_SET_ITEM(out, k++, var##_obj); \
    T *var = (T *)PyBytes_AS_STRING(var##_obj);

/* take() -> tuple of bytes columns of the flows ended since the last take (see fast.py) */
static PyObject *table_take(Table *t, PyObject *args) {
    /* with_community_id false: the Community ID column is left NULL, its SHA-1 being most of
     * this function's time; the journal (written every flush interval) fills it only when a
     * killed worker's flows are recovered */
    int with_cid = 1;
    if (!PyArg_ParseTuple(args, "|p", &with_cid)) return NULL;
    size_t n = t->nrows;
    const int NOUT = 35;
    PyObject *out = PyTuple_New(NOUT);
    if (!out) return NULL;
    int k = 0;
    Text texts[3] = {{0}, {0}, {0}};
    int32_t *offsets[3];
    PyTuple_SET_ITEM(out, k++, PyLong_FromSize_t(n));
    NEW_COL(vni, int32_t)
    NEW_COL(vlan, int16_t)
    NEW_COL(inner, int16_t)
    NEW_COL(ethertype, int32_t)
    NEW_COL(version, int8_t)
    NEW_COL(proto, int16_t)
    NEW_COL(sport, int32_t)
    NEW_COL(dport, int32_t)
    NEW_COL(first_ns, int64_t)
    NEW_COL(last_ns, int64_t)
    NEW_COL(first_us, int64_t)
    NEW_COL(last_us, int64_t)
    NEW_COL(packets, int64_t)
    NEW_COL(bytes, int64_t)
    NEW_COL(captured, int64_t)
    NEW_COL(truncated, int64_t)
    NEW_COL(rev_packets, int64_t)
    NEW_COL(rev_bytes, int64_t)
    NEW_COL(rev_captured, int64_t)
    NEW_COL(rev_truncated, int64_t)
    NEW_COL(flags, int16_t)
    NEW_COL(rev_flags, int16_t)
    NEW_COL(reason, uint8_t)
    NEW_COL(src_ok, uint8_t)
    NEW_COL(dst_ok, uint8_t)
    NEW_COL(cid_ok, uint8_t)
    PyObject *src_obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 16));
    if (!src_obj) goto fail;
    PyTuple_SET_ITEM(out, k++, src_obj);
    PyObject *dst_obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 16));
    if (!dst_obj) goto fail;
    PyTuple_SET_ITEM(out, k++, dst_obj);
    uint8_t *src = (uint8_t *)PyBytes_AS_STRING(src_obj), *dst = (uint8_t *)PyBytes_AS_STRING(dst_obj);
    PyObject *offset_objs[3];
    for (int j = 0; j < 3; j++) {
        offset_objs[j] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((n + 1) * sizeof(int32_t)));
        if (!offset_objs[j]) goto fail;
        PyTuple_SET_ITEM(out, k++, offset_objs[j]);
        offsets[j] = (int32_t *)PyBytes_AS_STRING(offset_objs[j]);
        offsets[j][0] = 0;
    }
    for (size_t i = 0; i < n; i++) {
        const Row *r = &t->rows[i];
        vni[i] = r->vni; vlan[i] = r->vlan; inner[i] = r->inner; ethertype[i] = r->ethertype;
        version[i] = r->version; proto[i] = r->proto; sport[i] = r->sport; dport[i] = r->dport;
        first_ns[i] = r->first_ns; last_ns[i] = r->last_ns;
        first_us[i] = floor_div(r->first_ns, 1000); last_us[i] = floor_div(r->last_ns, 1000);
        packets[i] = (int64_t)r->fwd[0]; bytes[i] = (int64_t)r->fwd[1];
        captured[i] = (int64_t)r->fwd[2]; truncated[i] = (int64_t)r->fwd[3];
        rev_packets[i] = (int64_t)r->rev[0]; rev_bytes[i] = (int64_t)r->rev[1];
        rev_captured[i] = (int64_t)r->rev[2]; rev_truncated[i] = (int64_t)r->rev[3];
        flags[i] = (int16_t)r->fwd_flags; rev_flags[i] = (int16_t)r->rev_flags;
        reason[i] = r->reason;
        src_ok[i] = r->ok & 1; dst_ok[i] = (r->ok >> 1) & 1;
        memcpy(src + 16 * i, r->src, 16);
        memcpy(dst + 16 * i, r->dst, 16);
        char text[64];
        size_t len;
        len = src_ok[i] ? ip_text(text, r->src, r->version) : 0;
        if (text_put(&texts[0], text, len) < 0) goto fail;
        len = dst_ok[i] ? ip_text(text, r->dst, r->version) : 0;
        if (text_put(&texts[1], text, len) < 0) goto fail;
        len = with_cid ? community_id(r, text) : 0;
        cid_ok[i] = len > 0;
        if (text_put(&texts[2], text, len) < 0) goto fail;
        for (int j = 0; j < 3; j++) offsets[j][i + 1] = (int32_t)texts[j].len;
    }
    for (int j = 0; j < 3; j++) {
        PyObject *data = PyBytes_FromStringAndSize(texts[j].data ? texts[j].data : "", (Py_ssize_t)texts[j].len);
        free(texts[j].data);
        texts[j].data = NULL;
        if (!data) goto fail;
        PyTuple_SET_ITEM(out, k++, data);
    }
    if (k != NOUT) {
        PyErr_SetString(PyExc_SystemError, "take: column count");
        goto fail;
    }
    t->nrows = 0;
    if (t->rows_cap > 65536) { /* a burst of exports does not pin its memory */
        free(t->rows);
        t->rows = NULL;
        t->rows_cap = 0;
    }
    return out;
fail:
    for (int j = 0; j < 3; j++) free(texts[j].data);
    /* unfilled tuple items are NULL, which tuple dealloc tolerates */
    Py_DECREF(out);
    return NULL;
}
#undef NEW_COL

/* ---- the type ---- */

static void table_free_all(Table *t) {
    for (size_t i = 0; i < t->nchunks; i++) free(t->chunks[i]);
    free(t->chunks);
    if (t->index.slots) big_free(t->index.slots, (t->index.mask + 1) * sizeof(uint32_t));
    big_free(t->heap, t->heap_cap * sizeof(uint32_t));
    free(t->frags);
    if (t->frag_index.slots) big_free(t->frag_index.slots, (t->frag_index.mask + 1) * sizeof(uint32_t));
    free(t->rows);
    t->chunks = NULL;
    t->index.slots = t->frag_index.slots = NULL;
    t->heap = NULL;
    t->frags = NULL;
    t->rows = NULL;
}

static int table_init(Table *t, PyObject *args, PyObject *kwds) {
    static char *names[] = {"idle_ns", "active_ns", "linger_ns", "fragment_ns", "max_flows",
                            "max_fragments", NULL};
    long long idle, active, linger, fragment;
    unsigned long long max_flows, max_fragments;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LLLLKK", names, &idle, &active, &linger,
                                     &fragment, &max_flows, &max_fragments))
        return -1;
    if (max_flows < 1 || max_fragments < 1 || max_flows >= NIL - 1 || max_fragments >= NIL - 1) {
        PyErr_SetString(PyExc_ValueError, "max_flows and max_fragments must be 1..2^32-2");
        return -1;
    }
    table_free_all(t);
    memset((char *)t + sizeof(PyObject), 0, sizeof(Table) - sizeof(PyObject));
    t->idle_ns = idle; t->active_ns = active; t->linger_ns = linger; t->fragment_ns = fragment;
    t->max_flows = max_flows; t->max_fragments = max_fragments;
    t->free_head = t->lru_head = t->lru_tail = NIL;
    t->frag_free = t->frag_head = t->frag_tail = NIL;
    if (index_init(&t->index, 1024) < 0 || index_init(&t->frag_index, 64) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void table_dealloc(Table *t) {
    table_free_all(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t table_len(Table *t) { return (Py_ssize_t)t->active; }

static PyObject *table_stats(Table *t, PyObject *unused) {
    PyObject *exported = PyTuple_New(N_END);
    if (!exported) return NULL;
    for (int i = 0; i < N_END; i++) PyTuple_SET_ITEM(exported, i, PyLong_FromUnsignedLongLong(t->exported[i]));
    return Py_BuildValue("(KN)", (unsigned long long)t->packets, exported);
}

static PyObject *table_memory(Table *t, PyObject *unused) {
    size_t bytes = t->nchunks * CHUNK * sizeof(Flow) + t->nchunks * sizeof(Flow *) +
                   (t->index.mask + 1) * 4 + t->heap_cap * 4 + t->frag_cap * sizeof(Frag) +
                   (t->frag_index.mask + 1) * 4 + t->rows_cap * sizeof(Row);
    return PyLong_FromSize_t(bytes);
}

static PyMethodDef table_methods[] = {
    {"add_batch", (PyCFunction)table_add_batch, METH_VARARGS,
     "add_batch(columns, ts): meter the decoded rows; returns the number of flows that ended"},
    {"expire", (PyCFunction)table_expire, METH_O, "expire(now_ns): end idle/active/closed flows"},
    {"drain", (PyCFunction)table_drain, METH_O, "drain(reason_code): end every flow"},
    {"snapshot", (PyCFunction)table_snapshot, METH_O,
     "snapshot(reason_code): rows of every open flow so far, the flows untouched"},
    {"checkpoint", (PyCFunction)table_checkpoint, METH_NOARGS,
     "checkpoint(): export every flow's piece so far and keep the flow"},
    {"take", (PyCFunction)table_take, METH_VARARGS,
     "take(with_community_id=True): the ended flows as columns"},
    {"stats", (PyCFunction)table_stats, METH_NOARGS, "stats(): (packets, exported per reason)"},
    {"memory", (PyCFunction)table_memory, METH_NOARGS, "memory(): bytes the table holds"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods table_as_sequence = {.sq_length = (lenfunc)table_len};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "collector._fastflow.FlowTable",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The flow table of collector/flows/table.py with its state in C records.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
    .tp_as_sequence = &table_as_sequence,
};

/* ip_texts(addresses (n*16 bytes), versions int8, ok uint8) -> (offsets, data): for tests and
 * for the packets table */
static PyObject *fast_ip_texts(PyObject *self, PyObject *args) {
    Py_buffer a, v, ok;
    if (!PyArg_ParseTuple(args, "y*y*y*", &a, &v, &ok)) return NULL;
    Py_ssize_t n = v.len;
    PyObject *result = NULL;
    if (a.len != n * 16 || ok.len != n) {
        PyErr_SetString(PyExc_ValueError, "ip_texts: sizes");
        goto done;
    }
    PyObject *offs = PyBytes_FromStringAndSize(NULL, (n + 1) * 4);
    if (!offs) goto done;
    int32_t *o = (int32_t *)PyBytes_AS_STRING(offs);
    Text x = {0};
    o[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        char text[64];
        size_t len = ((uint8_t *)ok.buf)[i] ? ip_text(text, (uint8_t *)a.buf + 16 * i, ((int8_t *)v.buf)[i]) : 0;
        if (text_put(&x, text, len) < 0) { free(x.data); Py_DECREF(offs); PyErr_NoMemory(); goto done; }
        o[i + 1] = (int32_t)x.len;
    }
    PyObject *data = PyBytes_FromStringAndSize(x.data ? x.data : "", (Py_ssize_t)x.len);
    free(x.data);
    if (!data) { Py_DECREF(offs); goto done; }
    result = Py_BuildValue("(NN)", offs, data);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&v);
    PyBuffer_Release(&ok);
    return result;
}

/* ---- per-batch counters (Pipeline._count): a few numpy reductions per receive batch cost
 * more than the decode of a 1,024-datagram batch itself ---- */

typedef struct {
    int32_t vni;
    int64_t wire;
} VniWire;

static int vni_wire_cmp(const void *x, const void *y) {
    int32_t a = ((const VniWire *)x)->vni, b = ((const VniWire *)y)->vni;
    return (a > b) - (a < b);
}

/* batch_counts(reason u8, vni i32, wire_len i32, truncated bool, nreasons)
 * -> (rows per reason code, truncated decoded rows, [(vni, decoded rows, wire bytes)...] in
 * VNI order); an unknown wire length (-1) counts 0 bytes */
static PyObject *fast_batch_counts(PyObject *self, PyObject *args) {
    Py_buffer rb, vb, wb, tb;
    Py_ssize_t nreasons;
    if (!PyArg_ParseTuple(args, "y*y*y*y*n", &rb, &vb, &wb, &tb, &nreasons)) return NULL;
    PyObject *result = NULL, *reasons = NULL, *groups = NULL;
    VniWire *pairs = NULL;
    uint64_t *counts = NULL;
    Py_ssize_t n = rb.len;
    const uint8_t *reason = rb.buf, *trunc = tb.buf;
    const int32_t *vni = vb.buf, *wire = wb.buf;
    if (vb.len != n * 4 || wb.len != n * 4 || tb.len != n || nreasons < 1 || nreasons > 256) {
        PyErr_SetString(PyExc_ValueError, "batch_counts: sizes");
        goto done;
    }
    counts = calloc((size_t)nreasons, sizeof(uint64_t));
    if (!counts) { PyErr_NoMemory(); goto done; }
    uint64_t truncated = 0, decoded = 0;
    int32_t low = INT32_MAX, high = INT32_MIN;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (reason[i] >= nreasons) { PyErr_SetString(PyExc_ValueError, "batch_counts: reason"); goto done; }
        counts[reason[i]]++;
        if (reason[i]) continue;
        decoded++;
        truncated += trunc[i] != 0;
        if (vni[i] < low) low = vni[i];
        if (vni[i] > high) high = vni[i];
    }
    reasons = PyList_New(nreasons);
    if (!reasons) goto done;
    for (Py_ssize_t k = 0; k < nreasons; k++) {
        PyObject *v = PyLong_FromUnsignedLongLong(counts[k]);
        if (!v) goto done;
        PyList_SET_ITEM(reasons, k, v);
    }
    groups = PyList_New(0);
    if (!groups) goto done;
    if (decoded && low == high) { /* the common batch: one session */
        int64_t bytes = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (!reason[i] && wire[i] > 0) bytes += wire[i];
        PyObject *g = Py_BuildValue("(iKL)", low, (unsigned long long)decoded, (long long)bytes);
        if (!g || PyList_Append(groups, g) < 0) { Py_XDECREF(g); goto done; }
        Py_DECREF(g);
    } else if (decoded) {
        pairs = malloc((size_t)decoded * sizeof(VniWire));
        if (!pairs) { PyErr_NoMemory(); goto done; }
        size_t m = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (!reason[i]) { pairs[m].vni = vni[i]; pairs[m].wire = wire[i] > 0 ? wire[i] : 0; m++; }
        qsort(pairs, m, sizeof(VniWire), vni_wire_cmp);
        for (size_t i = 0; i < m;) {
            size_t j = i;
            int64_t bytes = 0;
            while (j < m && pairs[j].vni == pairs[i].vni) bytes += pairs[j++].wire;
            PyObject *g = Py_BuildValue("(iKL)", pairs[i].vni, (unsigned long long)(j - i),
                                        (long long)bytes);
            if (!g || PyList_Append(groups, g) < 0) { Py_XDECREF(g); goto done; }
            Py_DECREF(g);
            i = j;
        }
    }
    result = Py_BuildValue("(OKO)", reasons, (unsigned long long)truncated, groups);
done:
    Py_XDECREF(reasons);
    Py_XDECREF(groups);
    free(pairs);
    free(counts);
    PyBuffer_Release(&rb);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&wb);
    PyBuffer_Release(&tb);
    return result;
}

static PyMethodDef module_methods[] = {
    {"batch_counts", fast_batch_counts, METH_VARARGS,
     "batch_counts(reason, vni, wire_len, truncated, nreasons) -> (per reason, truncated, groups)"},
    {"decode", fast_decode, METH_VARARGS,
     "decode(buf, lengths, present, port, columns, fallback) -> rows left to the reference"},
    {"ip_texts", fast_ip_texts, METH_VARARGS, "ip_texts(addresses, versions, ok) -> (offsets, data)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "collector._fastflow",
    "Compiled batch decode and flow table behind Pipeline.feed (see collector/flows/fast.py).",
    -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastflow(void) {
    if (PyType_Ready(&TableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(m, "FlowTable", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "COLUMNS", NCOLS);
    PyModule_AddIntConstant(m, "FLOW_RECORD_BYTES", (long)sizeof(Flow));
    return m;
}
