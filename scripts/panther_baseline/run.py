#!/usr/bin/env python3
"""Panther stateful-detection DynamoDB cost baseline on riskd's events.

usage: run.py EVENTS.jsonl --endpoint http://127.0.0.1:PORT --table TABLE [--limit N] [--json]

Runs each event through the five rules of rules.py (Panther's caching helpers,
panther-detection-helpers 1.0.2) against DynamoDB at --endpoint, and counts the
helpers' DynamoDB requests and capacity units two independent ways:
  (a) reported: ConsumedCapacity that DynamoDB returns (ReturnConsumedCapacity
      = TOTAL is added to every request by a botocore handler on the helpers'
      own client); a request that fails (ConditionalCheckFailedException)
      returns none, and DynamoDB Local reports 0 for a GetItem of a missing item;
  (b) computed: DynamoDB's documented size rules applied to a mirror of the
      table kept from what was sent and returned: write 1 unit per started KB
      of the larger of the item before and after (a failed conditional write
      too, at least 1), read 1 unit per started 4 KB of the whole item (a
      projection does not reduce it), half when eventually consistent, and a
      missing item costs as a 1-byte one. The mirror is checked against a
      scan of the table at the end.
Setup (table creation, the final scan) uses a separate client, not counted.
"""

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from decimal import Decimal

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("events")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--wall-clock", action="store_true",
                   help="leave the helpers on the machine's clock (as a naive replay would): "
                        "TTLs from event time then read as long expired")
    return p.parse_args()


# --- DynamoDB item sizes (https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/CapacityUnitCalculations.html)


def number_size(text: str) -> int:
    digits = text.lstrip("+-").lower().split("e")[0].replace(".", "").strip("0")
    return (max(len(digits), 1) + 1) // 2 + 1


def value_size(av: dict) -> int:
    (t, v), = av.items()
    if t == "S":
        return len(v.encode())
    if t == "N":
        return number_size(v)
    if t == "B":
        return len(v)
    if t == "SS":
        return sum(len(s.encode()) for s in v)
    if t == "NS":
        return sum(number_size(n) for n in v)
    if t == "BS":
        return sum(len(b) for b in v)
    if t in ("BOOL", "NULL"):
        return 1
    if t == "M":
        return 3 + sum(len(k.encode()) + value_size(x) for k, x in v.items())
    if t == "L":
        return 3 + sum(1 + value_size(x) for x in v)
    raise ValueError(t)


def item_size(item) -> int:
    if not item:
        return 0
    return sum(len(k.encode()) + value_size(v) for k, v in item.items())


def write_units(before: int, after: int) -> int:
    return max(1, math.ceil(max(before, after) / 1024))


def read_units(size: int, consistent: bool) -> float:
    u = max(1, math.ceil(size / 4096))
    return float(u) if consistent else u / 2


# --- applying an UpdateExpression to the mirror (the forms the helpers send)


def apply_update(item: dict, key_attr: dict, expr: str, names: dict, values: dict) -> dict:
    new = dict(item) if item else dict(key_attr)
    parts = re.split(r"\b(SET|ADD|REMOVE|DELETE)\b", expr, flags=re.I)
    for i in range(1, len(parts), 2):
        verb, body = parts[i].upper(), parts[i + 1]
        for action in [a.strip() for a in body.split(",") if a.strip()]:
            if verb == "SET":
                lhs, rhs = [x.strip() for x in action.split("=", 1)]
                new[names.get(lhs, lhs)] = values[rhs]
            elif verb == "REMOVE":
                new.pop(names.get(action, action), None)
            else:
                lhs, rhs = action.split()
                attr, v = names.get(lhs, lhs), values[rhs]
                cur = new.get(attr)
                if verb == "ADD" and "N" in v:
                    base = Decimal(cur["N"]) if cur else Decimal(0)
                    new[attr] = {"N": str(base + Decimal(v["N"]))}
                elif verb == "ADD":
                    (t, elems), = v.items()
                    merged = sorted(set(cur[t] if cur else []) | set(elems))
                    new[attr] = {t: merged}
                else:  # DELETE from a set
                    (t, elems), = v.items()
                    left = sorted(set(cur[t] if cur else []) - set(elems))
                    if left:
                        new[attr] = {t: left}
                    else:
                        new.pop(attr, None)
    return new


class Meter:
    """botocore handlers on the helpers' client: counts requests and units both ways."""

    def __init__(self, mirror):
        self.mirror = mirror  # key string -> item (AttributeValue dicts)
        self.pending = None
        self.requests = Counter()
        self.failed_conditional = 0
        self.reported = {"read": 0.0, "write": 0.0}
        self.reported_missing = 0  # responses without ConsumedCapacity
        self.computed = {"read": 0.0, "write": 0.0}
        self.consistency = Counter()
        self.keys = set()
        self.get_missing = 0
        self.missing_reported_zero = 0.0
        self.per_rule = {}

    def add_capacity(self, params, **_):
        params["ReturnConsumedCapacity"] = "TOTAL"

    def before_call(self, model, params, **_):
        body = params.get("body")
        body = json.loads(body) if isinstance(body, (bytes, str)) and body else {}
        self.pending = (model.name, body)

    def after_call(self, http_response, parsed, model, **_):
        op, req = self.pending
        self.pending = None
        self.requests[op] += 1
        kind = "read" if op in ("GetItem", "Query", "Scan", "BatchGetItem") else "write"
        cc = parsed.get("ConsumedCapacity") if isinstance(parsed, dict) else None
        if cc:
            self.reported[kind] += float(cc.get("CapacityUnits", 0))
        else:
            self.reported_missing += 1
        key_attr = req.get("Key") or {"key": req.get("Item", {}).get("key")}
        k = key_attr["key"]["S"]
        r = self.per_rule.setdefault(k.split("/", 1)[0], Counter())
        r[op] += 1
        units_before = (self.computed["read"], self.computed["write"])
        try:
            self._size(op, req, key_attr, k, http_response, parsed, cc)
        finally:
            r["read_units"] += self.computed["read"] - units_before[0]
            r["write_units"] += self.computed["write"] - units_before[1]

    def _size(self, op, req, key_attr, k, http_response, parsed, cc):
        self.keys.add(k)
        before = self.mirror.get(k)
        ok = http_response.status_code == 200
        if op == "GetItem":
            consistent = bool(req.get("ConsistentRead"))
            self.consistency["strong" if consistent else "eventual"] += 1
            if before is None:
                self.get_missing += 1
                if cc and float(cc.get("CapacityUnits", 0)) == 0:
                    # AWS charges a miss as a minimal read; some DynamoDB Local versions report 0.
                    self.missing_reported_zero += read_units(1, consistent)
            self.computed["read"] += read_units(item_size(before) or 1, consistent)
            return
        if not ok:
            code = parsed.get("Error", {}).get("Code") if isinstance(parsed, dict) else None
            if code == "ConditionalCheckFailedException":
                self.failed_conditional += 1
                self.computed["write"] += write_units(item_size(before), 0)
            return
        if op == "PutItem":
            after = req["Item"]
        elif op == "UpdateItem":
            after = apply_update(
                before, key_attr, req["UpdateExpression"],
                req.get("ExpressionAttributeNames", {}), req.get("ExpressionAttributeValues", {}),
            )
        elif op == "DeleteItem":
            after = None
        else:
            raise RuntimeError(f"unexpected request {op}")
        self.computed["write"] += write_units(item_size(before), item_size(after))
        if after is None:
            self.mirror.pop(k, None)
        else:
            self.mirror[k] = after


def main():
    args = parse_args()
    # The helpers build `boto3.resource("dynamodb", endpoint_url=None)` and
    # read the table name from KV_STORE_TABLE_NAME, so the endpoint comes in
    # through botocore's AWS_ENDPOINT_URL_DYNAMODB; set before the import.
    os.environ["AWS_ENDPOINT_URL_DYNAMODB"] = args.endpoint
    os.environ["KV_STORE_TABLE_NAME"] = args.table
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "local")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "local")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    os.environ.setdefault("AWS_DEFAULT_REGION", os.environ["AWS_REGION"])
    os.environ.pop("ENABLE_FIPS", None)
    sys.path.insert(0, HERE)
    import boto3
    from panther_detection_helpers import caching
    import rules

    admin = boto3.client("dynamodb", endpoint_url=args.endpoint)
    if args.table not in admin.list_tables()["TableNames"]:
        admin.create_table(
            TableName=args.table,
            KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        admin.get_waiter("table_exists").wait(TableName=args.table)

    def scan():
        out = {}
        for page in admin.get_paginator("scan").paginate(TableName=args.table, ConsistentRead=True):
            for it in page["Items"]:
                out[it["key"]["S"]] = it
        return out

    mirror = scan()
    preexisting = len(mirror)

    table = caching.kv_table()
    client = table.meta.client
    meter = Meter(mirror)
    ev = client.meta.events
    ev.register("before-parameter-build.dynamodb.*", meter.add_capacity)
    ev.register("before-call.dynamodb.*", meter.before_call)
    ev.register("after-call.dynamodb.*", meter.after_call)
    if not args.wall_clock:
        rules.use_event_clock()

    alerts = Counter()
    alert_list = []
    n = 0
    wall0 = time.time()
    t0 = time.perf_counter()
    with open(args.events) as f:
        for line in f:
            if args.limit is not None and n >= args.limit:
                break
            line = line.strip()
            if not line:
                continue
            event = json.loads(line)
            n += 1
            now = rules.event_time(event, wall0)
            rules.set_now(now)
            for rule_id, fn in rules.RULES:
                ctx = fn(event, now)
                if ctx is not None:
                    alerts[rule_id] += 1
                    alert_list.append({"rule": rule_id, "entity": rules.entity_of(rule_id, event),
                                       "event_time": rules.format_time(now)})
    elapsed = time.perf_counter() - t0

    # Check the mirror (what (b) sized) against the table itself.
    actual = scan()
    mismatched = sorted(k for k in set(actual) | set(mirror)
                        if item_size(actual.get(k)) != item_size(mirror.get(k)))

    per_k = 1000.0 / n if n else 0.0
    total_requests = sum(meter.requests.values())
    # A missing GetItem costs on AWS what DynamoDB Local reports as 0.
    reported_read_aws = meter.reported["read"] + meter.missing_reported_zero
    out = {
        "events": n,
        "seconds": round(elapsed, 3),
        "events_per_s": round(n / elapsed, 1) if elapsed else None,
        "endpoint": client.meta.endpoint_url,
        "table": args.table,
        "clock": "wall" if args.wall_clock else "event",
        "preexisting_items": preexisting,
        "requests": dict(meter.requests),
        "requests_total": total_requests,
        "failed_conditional_writes": meter.failed_conditional,
        "get_item_missing": meter.get_missing,
        "read_consistency": dict(meter.consistency),
        "per_1000_events": {
            "requests": round(total_requests * per_k, 2),
            "get_item": round(meter.requests["GetItem"] * per_k, 2),
            "update_item": round(meter.requests["UpdateItem"] * per_k, 2),
            "put_item": round(meter.requests["PutItem"] * per_k, 2),
            "failed_conditional_writes": round(meter.failed_conditional * per_k, 2),
            "reported_write_units": round(meter.reported["write"] * per_k, 2),
            "reported_read_units": round(meter.reported["read"] * per_k, 2),
            "reported_read_units_with_missing_gets_charged": round(reported_read_aws * per_k, 2),
            "computed_write_units": round(meter.computed["write"] * per_k, 2),
            "computed_read_units": round(meter.computed["read"] * per_k, 2),
        },
        "per_rule_per_1000_events": {
            r: {k: round(v * per_k, 2) for k, v in sorted(c.items())} for r, c in sorted(meter.per_rule.items())
        },
        "responses_without_consumed_capacity": meter.reported_missing,
        "distinct_keys": len(meter.keys),
        "items_at_end": len(actual),
        "mirror_mismatches": len(mismatched),
        "counter_window_starts": rules.counter_window_starts[0],
        "alerts": {r: alerts.get(r, 0) for r, _ in rules.RULES},
        "alerts_total": sum(alerts.values()),
    }
    if mismatched:
        out["mirror_mismatch_examples"] = mismatched[:5]
    if args.json:
        out["alert_list"] = alert_list
        print(json.dumps(out))
        return
    p = out["per_1000_events"]
    print(f"events                 {n} in {out['seconds']} s ({out['events_per_s']} events/s)")
    print(f"endpoint / table       {out['endpoint']} / {args.table} ({preexisting} items before)")
    print(f"requests               {total_requests}: " + ", ".join(f"{k} {v}" for k, v in sorted(meter.requests.items()))
          + f" ({meter.failed_conditional} UpdateItem failed their condition)")
    print(f"read consistency       {dict(meter.consistency)} (GetItem of a missing item: {meter.get_missing})")
    print("per 1,000 events:")
    print(f"  requests             {p['requests']}  (GetItem {p['get_item']}, UpdateItem {p['update_item']}, PutItem {p['put_item']})")
    print(f"  write units          reported {p['reported_write_units']}   computed {p['computed_write_units']}")
    print(f"  read units           reported {p['reported_read_units']} ({p['reported_read_units_with_missing_gets_charged']} with missing GetItems charged as on AWS)   computed {p['computed_read_units']}")
    for r, c in out["per_rule_per_1000_events"].items():
        print(f"  {r:30} " + ", ".join(f"{k} {v}" for k, v in c.items()))
    print(f"responses w/o capacity {meter.reported_missing} (failed conditional writes report none)")
    print(f"distinct keys          {len(meter.keys)} (items at end {len(actual)}, mirror mismatches {len(mismatched)})")
    print("alerts                 " + ", ".join(f"{r} {c}" for r, c in out["alerts"].items()) + f" (total {out['alerts_total']})")


if __name__ == "__main__":
    main()
