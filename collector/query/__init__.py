"""SQL over a collector dataset, through DuckDB.

`connect(data_dir)` returns a DuckDB connection with views:

- `flows`, `packets`, `sessions`: the Parquet tables (Hive partitions `date`, `hour` added),
  read by column name so that files of older schema versions stay readable;
- `conversations`: flow segments merged per conversation (both directions of a conversation
  may be metered by different workers or appliances, and a long flow is cut by the active
  timeout);
- `vpc_flow_logs`: the AWS VPC Flow Logs field names, one row per direction, so that Athena
  queries written for flow logs run here.

The inet extension is loaded from the `duckdb-extension-inet` wheel (never downloaded at run
time), so `src_addr::INET <<= '10.0.0.0/16'::INET` works; the macro `in_cidr(addr, cidr)`
says the same without the cast.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import duckdb
import pyarrow as pa

from collector.store.schema import TABLES

__all__ = ["connect", "lock", "QueryError", "inet_extension_path"]


class QueryError(ValueError):
    """A SQL statement DuckDB refused, with its one-line message."""


def wheel_extension_path(module: str, name: str) -> Path | None:
    """The `name` extension file that the `module` wheel (duckdb_extension_inet, ...) ships
    for this DuckDB version, if installed: extensions are never downloaded at run time."""
    try:
        package = importlib.import_module(module)
    except ImportError:
        return None
    path = (Path(package.__file__).parent / "extensions" / f"v{duckdb.__version__}"
            / f"{name}.duckdb_extension")
    return path if path.is_file() else None


def inet_extension_path() -> Path | None:
    """The inet extension file shipped by the wheel for this DuckDB version, if installed."""
    return wheel_extension_path("duckdb_extension_inet", "inet")


def connect(data_dir: str | os.PathLike = "data", *, database: str = ":memory:",
            sandbox: bool = True, settings: dict | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over the dataset in `data_dir` (which may be empty or absent), or
    in an object store: `s3://bucket/prefix` (collector/query/remote.py).

    The connection is confined to the dataset (`lock`) unless `sandbox` is false; DuckDB
    `settings` ({"TimeZone": "UTC", "threads": 2}) are applied before the lock, which
    refuses any SET after it."""
    if isinstance(data_dir, str) and data_dir.startswith("s3://"):
        from collector.query import remote

        return remote.connect(data_dir, database=database, sandbox=sandbox, settings=settings)
    root = Path(data_dir)
    return open_views(duckdb.connect(database), root, root, sandbox=sandbox, settings=settings)


def open_views(con: duckdb.DuckDBPyConnection, location, allowed: str | os.PathLike, *,
               sandbox: bool, settings: dict | None) -> duckdb.DuckDBPyConnection:
    """Make the views of the dataset at `location` (a directory, or a manifest.Location in an
    object store, whose filesystem `con` can already read) on `con`, then `finish` it."""
    from collector.store.manifest import ManifestCache, live_files

    has_inet = _load_inet(con)
    cache = ManifestCache()
    # The file list is made at each query, manifest-aware (compaction: collector/store/manifest.py)
    con.create_function("collector_live_files", lambda table: live_files(location, table, cache),
                        ["VARCHAR"], "VARCHAR[]", side_effects=True)
    for table, schema in TABLES.items():
        source = (_parquet_source(table) if live_files(location, table, cache)
                  else _empty_source(con, table, schema))
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {source}")
    finish(con, allowed, has_inet=has_inet, sandbox=sandbox, settings=settings)
    return con


def _load_inet(con: duckdb.DuckDBPyConnection) -> bool:
    extension = inet_extension_path()
    if extension is None:
        return False
    try:
        con.execute(f"LOAD '{_quote(str(extension))}'")
        return True
    except duckdb.Error:
        return False  # an extension that does not load leaves the string macro


def finish(con: duckdb.DuckDBPyConnection, allowed: str | os.PathLike, *, has_inet: bool,
           sandbox: bool, settings: dict | None) -> None:
    """The steps after the table views, for a local or a remote dataset: the derived views,
    the in_cidr macro, the caller's settings, then the lock (last: it freezes the rest)."""
    con.execute(_CONVERSATIONS)
    con.execute(_VPC_FLOW_LOGS)
    if has_inet:
        con.execute("CREATE OR REPLACE MACRO in_cidr(addr, cidr) AS addr::INET <<= cidr::INET")
    for name, value in (settings or {}).items():
        if not str(name).replace("_", "").isalnum():
            raise QueryError(f"not a DuckDB setting name: {name!r}")
        con.execute(f"SET {name} = ?", [value])
    if sandbox:
        lock(con, allowed)


def lock(con: duckdb.DuckDBPyConnection, *allowed: str | os.PathLike) -> None:
    """Confine `con` to the dataset, for SQL written by someone else (docs/robustness.md,
    Security): after this, DuckDB reads and writes files only under the `allowed` directories
    or URL prefixes (the dataset; `s3://bucket/prefix/` for a remote one), loads and installs
    no extension, attaches no database file, and refuses any SET, so none of it can be undone.
    `read_csv('/etc/passwd')`, `COPY ... TO '/tmp/x'`, `ATTACH`, `INSTALL`/`LOAD` raise
    duckdb.PermissionException. Call it last: the views, macros and extensions must be set up
    before. `connect(..., sandbox=False)` skips it, for Python code that wants DuckDB's file
    access on the same connection.
    """
    prefixes = []
    for path in allowed:
        text = str(path)
        if "://" not in text:
            # DuckDB matches prefixes of the path as a query names it: allow the directory as
            # given (possibly relative) and absolute, each ending in "/" so that "data" does
            # not also allow "data-other"
            prefixes += {text.rstrip("/") + "/", os.path.abspath(text).rstrip("/") + "/"}
        else:
            prefixes.append(text.rstrip("/") + "/")
    listed = ", ".join(f"'{_quote(prefix)}'" for prefix in prefixes)
    con.execute(f"SET allowed_directories = [{listed}]")
    for setting in ("autoinstall_known_extensions", "autoload_known_extensions",
                    "allow_community_extensions", "enable_external_access"):
        con.execute(f"SET {setting} = false")
    con.execute("SET lock_configuration = true")


def _quote(text: str) -> str:
    return text.replace("'", "''")


def _parquet_source(table: str) -> str:
    # not a glob: the live files of each partition by its manifest, listed when a query binds
    # (so files written later are seen, and compaction never shows a row twice)
    return (f"SELECT * FROM read_parquet(collector_live_files('{table}'), hive_partitioning = true, "
            f"union_by_name = true, hive_types = {{'date': DATE, 'hour': INTEGER}})")


def _empty_source(con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema) -> str:
    """No file yet: an empty relation of the right types, so queries still bind. A connection
    made now does not see files written later: reconnect (each `collector query` does)."""
    empty = pa.Table.from_batches([], schema=schema.append(pa.field("date", pa.date32()))
                                  .append(pa.field("hour", pa.int32())))
    name = f"_empty_{table}"
    con.register(name, empty)
    return f"SELECT * FROM {name}"


_CONVERSATIONS = """
CREATE OR REPLACE VIEW conversations AS
WITH segments AS (
    -- the unordered endpoint pair: the same for every segment of a conversation, whichever
    -- direction each was metered from
    SELECT *,
        coalesce((src_addr, src_port) <= (dst_addr, dst_port), true) AS src_is_low,
        CASE WHEN src_is_low THEN src_addr ELSE dst_addr END AS low_addr,
        CASE WHEN src_is_low THEN src_port ELSE dst_port END AS low_port,
        CASE WHEN src_is_low THEN dst_addr ELSE src_addr END AS high_addr,
        CASE WHEN src_is_low THEN dst_port ELSE src_port END AS high_port
    FROM flows
),
chained AS (
    -- segments of one endpoint pair chain into one conversation while each starts within the
    -- gap (default 60 s, the default idle timeout) of the latest end before it: a reused
    -- 5-tuple (a DNS client's port, days later) starts a new conversation
    SELECT *, max(last_seen) OVER (PARTITION BY vni, vlan_id, inner_vlan_id, ip_version, protocol,
                                                low_addr, low_port, high_addr, high_port
                                   ORDER BY first_seen, last_seen
                                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS reached
    FROM segments
),
numbered AS (
    SELECT *, sum(CASE WHEN reached IS NULL OR first_seen > reached
                           + coalesce(getvariable('conversation_gap'), INTERVAL 60 SECOND)
                  THEN 1 ELSE 0 END)
              OVER (PARTITION BY vni, vlan_id, inner_vlan_id, ip_version, protocol,
                                 low_addr, low_port, high_addr, high_port
                    ORDER BY first_seen, last_seen ROWS UNBOUNDED PRECEDING) AS conversation_number
    FROM chained
),
oriented AS (
    -- the conversation's initiator: the initiator of its earliest segment; on a tie (both
    -- directions first seen in the same microsecond by two appliances) a segment that
    -- opened with a SYN alone, then the side with the higher (ephemeral) port
    SELECT *, arg_min(src_is_low, (first_seen, coalesce(tcp_flags & 18 <> 2, true),
                                   coalesce(src_port < dst_port, true), src_is_low))
              OVER conversation AS initiator_is_low
    FROM numbered
    WINDOW conversation AS (PARTITION BY vni, vlan_id, inner_vlan_id, ip_version, protocol,
                                         low_addr, low_port, high_addr, high_port,
                                         conversation_number)
),
merged AS (
    SELECT
        vni, any_value(session_id) AS session_id, vlan_id, inner_vlan_id, ip_version, protocol,
        CASE WHEN initiator_is_low THEN low_addr ELSE high_addr END AS src_addr,
        CASE WHEN initiator_is_low THEN high_addr ELSE low_addr END AS dst_addr,
        CASE WHEN initiator_is_low THEN low_port ELSE high_port END AS src_port,
        CASE WHEN initiator_is_low THEN high_port ELSE low_port END AS dst_port,
        min(first_seen) AS first_seen, max(last_seen) AS last_seen,
        sum(CASE WHEN src_is_low = initiator_is_low THEN packets ELSE rev_packets END) AS packets,
        sum(CASE WHEN src_is_low = initiator_is_low THEN bytes ELSE rev_bytes END) AS bytes,
        sum(CASE WHEN src_is_low = initiator_is_low THEN rev_packets ELSE packets END) AS rev_packets,
        sum(CASE WHEN src_is_low = initiator_is_low THEN rev_bytes ELSE bytes END) AS rev_bytes,
        sum(coalesce(truncated_packets, 0) + coalesce(rev_truncated_packets, 0)) AS truncated_packets,
        bit_or(CASE WHEN src_is_low = initiator_is_low THEN tcp_flags ELSE rev_tcp_flags END) AS tcp_flags,
        bit_or(CASE WHEN src_is_low = initiator_is_low THEN rev_tcp_flags ELSE tcp_flags END) AS rev_tcp_flags,
        any_value(community_id) AS community_id,
        count(*) AS segments, count(DISTINCT collector_id) AS collectors,
        bool_or(end_reason = 'rst') AS any_rst, bool_or(end_reason = 'fin') AS any_fin,
        arg_max(end_reason, (last_seen, list_position(
            ['active', 'flush', 'crash', 'shutdown', 'evicted', 'idle', 'fin', 'rst'], end_reason))) AS last_reason,
        sum(CASE WHEN src_is_low = initiator_is_low THEN captured_bytes ELSE rev_captured_bytes END)
            AS captured_bytes,
        sum(CASE WHEN src_is_low = initiator_is_low THEN rev_captured_bytes ELSE captured_bytes END)
            AS rev_captured_bytes
    FROM oriented
    GROUP BY vni, vlan_id, inner_vlan_id, ip_version, protocol, low_addr, low_port, high_addr,
             high_port, conversation_number, initiator_is_low
)
SELECT
    vni, session_id, vlan_id, inner_vlan_id, ip_version, protocol, src_addr, dst_addr, src_port,
    dst_port, first_seen, last_seen, packets, bytes, rev_packets, rev_bytes, truncated_packets,
    tcp_flags, rev_tcp_flags, community_id, segments, collectors,
    -- how it ended: a RST or a FIN close seen by a segment, or FINs both ways seen apart (an
    -- appliance metering one direction sees one FIN and ends its segment 'idle'); else the
    -- reason of the segment that ended last (the most final one on a tie)
    CASE WHEN any_rst THEN 'rst'
         WHEN any_fin OR (protocol = 6 AND tcp_flags & 1 = 1 AND rev_tcp_flags & 1 = 1) THEN 'fin'
         ELSE last_reason END AS end_reason,
    captured_bytes, rev_captured_bytes
FROM merged
"""

_VPC_FLOW_LOGS = """
CREATE OR REPLACE VIEW vpc_flow_logs AS
WITH directed AS (
    SELECT f.*, src_addr AS a, dst_addr AS b, src_port AS a_port, dst_port AS b_port,
           packets AS n_packets, bytes AS n_bytes, tcp_flags AS n_flags FROM flows f
    UNION ALL
    SELECT f.*, dst_addr, src_addr, dst_port, src_port, rev_packets, rev_bytes, rev_tcp_flags
    FROM flows f WHERE rev_packets > 0
)
SELECT
    5 AS "version",
    s.owner_id AS "account-id",
    d.network_interface_id AS "interface-id",
    d.a AS srcaddr, d.b AS dstaddr, d.a_port AS srcport, d.b_port AS dstport,
    d.protocol AS protocol, d.n_packets AS packets, d.n_bytes AS bytes,
    epoch(d.first_seen)::BIGINT AS "start", epoch(d.last_seen)::BIGINT AS "end",
    'ACCEPT' AS "action", 'OK' AS "log-status",
    NULL::VARCHAR AS "vpc-id", NULL::VARCHAR AS "subnet-id", NULL::VARCHAR AS "instance-id",
    (d.n_flags & 63)::INTEGER AS "tcp-flags",
    CASE d.ip_version WHEN 4 THEN 'IPv4' WHEN 6 THEN 'IPv6' END AS "type",
    d.a AS "pkt-srcaddr", d.b AS "pkt-dstaddr",
    NULL::VARCHAR AS "flow-direction",
    d.vni, d.session_id, d.collector_id
FROM directed d
LEFT JOIN (SELECT vni, any_value(owner_id) AS owner_id FROM sessions GROUP BY vni) s USING (vni)
"""
