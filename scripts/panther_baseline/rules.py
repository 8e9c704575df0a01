"""riskd's five stateful rules written as Panther detections, for a DynamoDB cost baseline.

Each rule keeps its state with panther_detection_helpers.caching (1.0.2), the
helpers Panther rules use, in the `panther-kv-store` table. The state keys are
riskd's (`<rule id>/<entity type>/<entity id>`) so the key counts compare.
Conditions are those of config/rules/aws_cloudtrail.yaml and okta.yaml.

The helpers take "now" from `datetime.now()` (TTLs they write, the condition
`expiresAt >= now` of increment_counter/add_to_string_set, force_ttl_check).
Live, Panther runs near real time so that clock is the event's; a replay of
old events must move it with the events, so `use_event_clock()` swaps the
module's `datetime` for one whose now() is the current event's time. Nothing
else of the helpers is replaced: every DynamoDB request is theirs.

Each rule is `rule(event, now) -> alert context or None`; `now` is the event
time (epoch seconds).
"""

import json
import math
from datetime import datetime, timezone
from typing import Any, Callable, List, Optional, Tuple

from panther_detection_helpers import caching
from panther_detection_helpers.caching import (
    add_to_string_set,
    get_dictionary,
    get_string_set,
    increment_counter,
    put_dictionary,
    reset_counter,
    reset_string_set,
    set_key_expiration,
)

HOUR = 3600
DAY = 86400

# --- the clock the helpers read -------------------------------------------------

_NOW = [0.0]


class _EventClock(datetime):
    """datetime whose now() is the event being processed (see the module doc)."""

    @classmethod
    def now(cls, tz=None):  # noqa: D102 - same signature as datetime.now
        return datetime.fromtimestamp(_NOW[0], tz=tz or timezone.utc)


def use_event_clock() -> None:
    caching.datetime = _EventClock


def set_now(epoch_seconds: float) -> None:
    _NOW[0] = epoch_seconds


# --- event access, as riskd reads it -------------------------------------------

_MISSING = object()


def deep_get(event: dict, path: str) -> Any:
    cur: Any = event
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def has(event: dict, path: str) -> bool:
    return deep_get(event, path) is not _MISSING


def scalar(event: dict, path: str) -> Optional[str]:
    """A field as riskd's entity ids and set values read it: a scalar, as text."""
    v = deep_get(event, path)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return v if isinstance(v, str) else json.dumps(v)
    return None


def eq(event: dict, path: str, value: str) -> bool:
    """`path == "value"`: an absent field never matches (riskd's condition rules)."""
    return deep_get(event, path) == value


def format_time(epoch_seconds: float) -> str:
    ms = int(round(epoch_seconds * 1000))
    t = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000)


def event_time(event: dict, fallback: float) -> float:
    for path in ("p_event_time", "eventTime", "published"):
        v = deep_get(event, path)
        if isinstance(v, str):
            try:
                return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return fallback


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = math.radians(lat2 - lat1), math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(a)))


# --- the rules ------------------------------------------------------------------

# Window starts of aws_access_denied_burst: where the brief's pattern would
# call set_key_expiration (see that rule); counted so the report can say
# what it would add.
counter_window_starts = [0]


def aws_access_denied_burst(event: dict, now: float) -> Optional[dict]:
    """Ten AccessDenied by one principal within an hour: count, threshold 10, reset on fire.

    increment_counter in 1.0.2 writes the TTL on every call (its first,
    conditional UpdateItem always has `SET expiresAt = :time`, and
    epoch_seconds=None means "90 days" there), so the window cannot be held
    at the first error with it: the classic `if count == 1:
    set_key_expiration(...)` is overwritten by the next increment (to 90
    days with the default epoch_seconds). Passing the window length makes
    it an hour from the *latest* error (Panther's own evaluate_threshold
    does exactly this), the closest the helper allows, and a
    set_key_expiration at count 1 would be a write with no effect, so it is
    left out (counted in counter_window_starts).
    """
    if not eq(event, "errorCode", "AccessDenied"):
        return None
    arn = scalar(event, "userIdentity.arn")
    if arn is None:
        return None
    key = f"aws_access_denied_burst/principal/{arn}"
    count = increment_counter(key, epoch_seconds=int(now) + HOUR)
    if count == 1:
        counter_window_starts[0] += 1
    if count >= 10:
        reset_counter(key)
        return {"count": int(count), "threshold": 10}
    return None


def aws_assume_role_new_source_ip(event: dict, now: float) -> Optional[dict]:
    """A role assumed from an IP not seen for it in 30 days (first IP trusted)."""
    if not (eq(event, "eventName", "AssumeRole") and has(event, "requestParameters.roleArn")):
        return None
    ip_raw = deep_get(event, "sourceIPAddress")
    if ip_raw is _MISSING or ip_raw == "":
        return None
    role = scalar(event, "requestParameters.roleArn")
    ip = scalar(event, "sourceIPAddress")
    if role is None or ip is None:
        return None
    key = f"aws_assume_role_new_source_ip/role/{role}"
    expires = int(now) + 30 * DAY
    known = get_string_set(key, force_ttl_check=True)
    if ip in known:
        # Keep the set for another 30 days from this use.
        set_key_expiration(key, expires)
        return None
    add_to_string_set(key, ip, epoch_seconds=expires)
    if not known:
        return None  # trust on first use
    return {"new_value": ip, "known_count": len(known)}


def aws_console_login_spray(event: dict, now: float) -> Optional[dict]:
    """Failed console logins for 20 distinct users from one IP within an hour of the first."""
    if not (eq(event, "eventName", "ConsoleLogin") and eq(event, "responseElements.ConsoleLogin", "Failure")):
        return None
    ip = scalar(event, "sourceIPAddress")
    user = scalar(event, "userIdentity.userName")
    if ip is None or user is None:
        return None
    key = f"aws_console_login_spray/ip/{ip}"
    # epoch_seconds=None: add_to_string_set leaves the TTL alone (unlike
    # increment_counter), so the window is set once, at its first user.
    users = add_to_string_set(key, user, epoch_seconds=None)
    if len(users) == 1:
        set_key_expiration(key, int(now) + HOUR)
    if len(users) >= 20:
        reset_string_set(key)
        return {"distinct": len(users), "threshold": 20}
    return None


def okta_ip_change(event: dict, now: float) -> Optional[dict]:
    """A login from another IP than the user's previous login (within 7 days)."""
    if not eq(event, "eventType", "user.session.start"):
        return None
    user = scalar(event, "actor.alternateId")
    ip = deep_get(event, "client.ipAddress")
    if user is None or ip is _MISSING:
        return None
    key = f"okta_ip_change/user/{user}"
    previous = get_dictionary(key, force_ttl_check=True)
    put_dictionary(key, {"ip": ip, "time": format_time(now)}, epoch_seconds=int(now) + 7 * DAY)
    if "ip" in previous and previous["ip"] != ip:
        return {"previous": previous, "current": {"ip": ip}}
    return None


def _number(v: Any, limit: float) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            return None
    if isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= limit:
        return float(v)
    return None


def okta_impossible_travel(event: dict, now: float) -> Optional[dict]:
    """Two logins over 100 km apart at over 900 km/h (same instant: infinitely fast)."""
    if not (
        eq(event, "eventType", "user.session.start")
        and has(event, "client.geographicalContext.geolocation.lat")
        and has(event, "client.geographicalContext.geolocation.lon")
    ):
        return None
    user = scalar(event, "actor.alternateId")
    lat = _number(deep_get(event, "client.geographicalContext.geolocation.lat"), 90.0)
    lon = _number(deep_get(event, "client.geographicalContext.geolocation.lon"), 180.0)
    if user is None or lat is None or lon is None:
        return None
    city = deep_get(event, "client.geographicalContext.city")
    city = None if city is _MISSING else city
    key = f"okta_impossible_travel/user/{user}"
    previous = get_dictionary(key, force_ttl_check=True)
    current = {"city": city, "lat": lat, "lon": lon, "time": format_time(now)}
    put_dictionary(key, current, epoch_seconds=int(now) + 7 * DAY)
    try:
        plat, plon = float(previous["lat"]), float(previous["lon"])
        ptime = datetime.fromisoformat(str(previous["time"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, TypeError, ValueError):
        return None
    km = haversine_km(plat, plon, lat, lon)
    hours = (now - ptime) / 3600.0
    kmh = math.inf if hours <= 0 else km / hours
    if km > 100 and kmh > 900:
        return {
            "distance_km": round(km, 1),
            "speed_kmh": round(kmh, 1) if math.isfinite(kmh) else None,
            "previous": previous,
            "current": current,
        }
    return None


RULES: List[Tuple[str, Callable[[dict, float], Optional[dict]]]] = [
    ("aws_access_denied_burst", aws_access_denied_burst),
    ("aws_assume_role_new_source_ip", aws_assume_role_new_source_ip),
    ("aws_console_login_spray", aws_console_login_spray),
    ("okta_ip_change", okta_ip_change),
    ("okta_impossible_travel", okta_impossible_travel),
]

ENTITY = {
    "aws_access_denied_burst": "userIdentity.arn",
    "aws_assume_role_new_source_ip": "requestParameters.roleArn",
    "aws_console_login_spray": "sourceIPAddress",
    "okta_ip_change": "actor.alternateId",
    "okta_impossible_travel": "actor.alternateId",
}


def entity_of(rule_id: str, event: dict) -> Optional[str]:
    return scalar(event, ENTITY[rule_id])


__all__ = ["RULES", "ENTITY", "entity_of", "event_time", "format_time", "set_now", "use_event_clock", "counter_window_starts"]
