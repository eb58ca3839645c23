"""A realistic, deterministic generator of ``audience_events`` rows for demos, tests and benchmarks.

The shape of the data follows what a real audience produces, so that every code path of the jobs
gets exercised at scale:

* activity per user is heavy-tailed (a Lomax draw of sessions: most users come a few times, a few
  come hundreds of times), sessions hold several events a few seconds to minutes apart;
* each user has a funnel depth (a tier 0..5) that decides which event types it produces, and a
  recency (days since its last session) spread so that after a derivation every state S0..S5
  occurs: many S0/S1, few S5, and a share of users quiet for 45-75+ days (the retention rules);
* users of tier t carry the "milestone" events of every gate up to t in their latest session, so
  the funnel is reached by construction rather than by luck;
* about 5 % of the rows are anonymous (logged-out sessions), a few sessions have no session id;
* with ``bursts`` some events repeat several times less than 3 s apart (client retries);
  without it no two events of one (user, event_type, session) group are within 4 s;
* with ``dirty`` the rows every validation rule and fail-safe must catch: malformed metadata,
  unknown categories and event types, event types under the wrong category, subscription events
  without a boolean ``consent_recorded`` and a few spam users with more than 500 events in an hour.

Everything is drawn with numpy from one seeded generator and assembled with polars expressions:
no per-row Python. The same arguments always give the same frame.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from derive.config import SYSTEM_CATEGORY, Rules

# Column names and dtypes of a generated frame, in the order of the audience_events table.
EVENT_COLUMNS: dict[str, pl.DataType] = {
    "created_at": pl.Datetime("us", "UTC"),
    "user_id": pl.String(),
    "session_id": pl.String(),
    "event_type": pl.String(),
    "event_category": pl.String(),
    "event_source": pl.String(),
    "utm_source": pl.String(),
    "utm_medium": pl.String(),
    "utm_campaign": pl.String(),
    "utm_content": pl.String(),
    "utm_term": pl.String(),
    "metadata": pl.String(),
}

UNKNOWN_CATEGORY = "telemetry"
UNKNOWN_CATEGORY_EVENT_TYPE = "heartbeat"
UNKNOWN_EVENT_TYPE = "page_ping"

_US = 1_000_000
_DAY_US = 86_400 * _US

# Funnel level and relative frequency of the canonical event types. A user of tier t draws from the
# types of level <= t. Types of another catalog fall back to their category's level, frequency 1.
_TYPE_PROFILE: dict[str, tuple[int, float]] = {
    "content_view": (0, 10.0),
    "multi_internal_click": (0, 2.0),
    "utm_landing": (0, 1.5),
    "affiliate_click": (0, 0.5),
    "scroll_depth_75": (1, 2.5),
    "video_completion_75": (1, 1.2),
    "long_form_completion": (1, 0.4),
    "repeat_session_30d": (2, 1.0),
    "high_frequency_session": (2, 0.6),
    "email_subscribe": (3, 0.3),
    "asset_download": (3, 0.5),
    "content_share": (4, 0.8),
    "referral_click": (4, 0.5),
    "comment_repeat": (4, 0.5),
    "mention_tag": (4, 0.3),
    "advocacy_repeat": (4, 0.3),
}
_CATEGORY_LEVEL = {
    "engagement": 0,
    "attribution": 0,
    "retention": 2,
    "subscription": 3,
    "advocacy": 4,
}

# Events a user of the given tier always has in its latest session: the evidence of gates G1..G5.
_MILESTONES: tuple[tuple[int, str], ...] = (
    (1, "scroll_depth_75"),
    (2, "repeat_session_30d"),
    (3, "email_subscribe"),
    (4, "content_share"),
    (5, "long_form_completion"),
    (5, "repeat_session_30d"),
    (5, "referral_click"),
    (5, "comment_repeat"),
)
_TIER_SHARE = np.array([0.30, 0.28, 0.20, 0.12, 0.07, 0.03])
# Recency mixture in days on a 120-day horizon (scaled to ``days``): share, low, high.
_RECENCY = ((0.42, 0.0, 7.0), (0.23, 7.0, 45.0), (0.20, 45.0, 75.0), (0.15, 75.0, 118.0))

_SOURCES = ("web", "ios", "android", "email")
_SOURCE_SHARE = np.array([0.60, 0.18, 0.14, 0.08])
_CAMPAIGNS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("google", "cpc", "brand_search", None, "audience analytics"),
    ("newsletter", "email", "weekly_digest", "top_story", None),
    ("twitter", "social", "launch_week", "thread", None),
    ("partner_blog", "referral", "guest_post", None, None),
    ("facebook", "paid_social", "retargeting", "carousel", None),
    ("linkedin", "social", "b2b_push", None, None),
    ("affiliate_net", "affiliate", "spring_promo", "banner_a", "creator tools"),
)

_MEAN_SESSION_SCALE = 4.4  # Lomax scale: about 23 events per user on average with the rest below
_LOMAX_SHAPE = 1.7
_MAX_SESSIONS = 400
_EXTRA_EVENTS_PER_SESSION = 2.2  # Poisson mean on top of the first event
_MIN_GAP_S = 4.0  # events of one session are at least this far apart (> the 3 s dedupe window)
_MEAN_EXTRA_GAP_S = 35.0
_ANONYMOUS_SESSION_SHARE = 0.064
_NO_SESSION_ID_SHARE = 0.04
_CAMPAIGN_SESSION_SHARE = 0.25
_BURST_SHARE = 0.015
_SPAM_SPACING_S = 4.5

# Dirty rows, as shares of their pool (each kind gets at least _MIN_DIRTY rows).
_MALFORMED_SHARE = 0.004
_UNKNOWN_CATEGORY_SHARE = 0.001
_UNKNOWN_TYPE_SHARE = 0.0005
_WRONG_CATEGORY_SHARE = 0.001
_NO_CONSENT_SHARE = 0.10
_MIN_DIRTY = 3
_MALFORMED_METADATA = (
    '{"duration_seconds": "abc", "scroll_depth_percent": 10}',
    '{"duration_seconds": true}',
    "[1, 2, 3]",
    '"not an object"',
)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def user_ids(users: int, /, *, seed: int) -> pl.Series:
    """``users`` random (version 4) UUIDs as text, drawn from ``seed`` alone.

    The same seed always yields the same ids, so demo data, tests and benchmarks can name users.
    """
    rng = np.random.default_rng([seed, 0x1D5])
    raw = rng.integers(0, 256, size=(users, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    hexed = np.empty((users, 32), dtype=np.uint8)
    hexed[:, 0::2] = digits[raw >> 4]
    hexed[:, 1::2] = digits[raw & 0x0F]
    dash = np.full((users, 1), ord("-"), dtype=np.uint8)
    text = np.hstack(
        [
            hexed[:, :8],
            dash,
            hexed[:, 8:12],
            dash,
            hexed[:, 12:16],
            dash,
            hexed[:, 16:20],
            dash,
            hexed[:, 20:],
        ]
    )
    ids = np.ascontiguousarray(text).view("S36").ravel().astype("U36")
    return pl.Series("user_id", ids, dtype=pl.String)


def demo_users(users: int, /, *, seed: int) -> pl.DataFrame:
    """The ``users`` rows of :func:`user_ids`: ``id`` and a 32-byte ``attribution_salt``."""
    rng = np.random.default_rng([seed, 0x5A17])
    raw = rng.integers(0, 256, size=(users, 32), dtype=np.uint8)
    salts = pa.Array.from_buffers(pa.binary(32), users, [None, pa.py_buffer(raw.tobytes())])
    salt = pl.Series("attribution_salt", salts, dtype=pl.Binary)
    return pl.DataFrame([user_ids(users, seed=seed).alias("id"), salt])


def generate_events(
    users: int,
    /,
    *,
    as_of: datetime,
    rules: Rules,
    days: int = 120,
    seed: int = 0,
    dirty: bool = False,
    bursts: bool = True,
) -> pl.DataFrame:
    """Generate the raw events of ``users`` users over the ``days`` days up to ``as_of``.

    Args:
        users: how many distinct (logged-in) users; about 23 events each on average.
        as_of: the newest possible timestamp; every row has ``as_of - days < created_at <= as_of``.
        rules: the event types and categories come from its catalog (system types excluded:
            those rows are written by the derivation itself), the content_view thresholds and the
            consent categories from its other sections.
        days: the time span covered.
        seed: the same seed gives the same frame.
        dirty: add the invalid rows and spam users described in the module docstring.
        bursts: add near-duplicate bursts; without it no two rows of one (user_id, event_type,
            session_id) group, nulls included, are less than 4 s apart.

    Returns:
        A frame with the columns of :data:`EVENT_COLUMNS`, sorted by ``created_at``.
    """
    if users < 0 or days < 1 or seed < 0:
        raise ValueError(f"need users >= 0, days >= 1, seed >= 0 (got {users}, {days}, {seed})")
    if users == 0:
        return pl.DataFrame(schema=EVENT_COLUMNS)
    rng = np.random.default_rng([seed, 0xE7])
    catalog = _Catalog.from_rules(rules)
    horizon_us = days * _DAY_US

    events = _base_events(rng, users, catalog, days)
    if dirty:
        events = _add_dirt(rng, events, catalog, users, horizon_us)
    events = _space_out(events)
    if bursts:
        events = _add_bursts(rng, events)
    events = events.with_columns(user_id=user_ids(users, seed=seed).gather(events["user"]))
    as_of_us = _epoch_us(as_of)
    return (
        events.filter((pl.col("ago_us") >= 0) & (pl.col("ago_us") < horizon_us))
        .with_columns(
            created_at=(pl.lit(as_of_us, pl.Int64) - pl.col("ago_us")).cast(
                pl.Datetime("us", "UTC")
            ),
            user_id=pl.when(pl.col("anonymous")).then(None).otherwise(pl.col("user_id")),
            # The user's id in the session id makes it unique across seeds and blocks.
            session_id=pl.concat_str(
                pl.col("user_id").str.slice(0, 13), pl.lit("/"), pl.col("session_id")
            ),
        )
        .select(list(EVENT_COLUMNS))
        .sort("created_at", maintain_order=True)
    )


class _Catalog:
    """The scored catalog as arrays: type names, categories, levels and draw weights."""

    def __init__(
        self,
        types: list[str],
        categories: list[str],
        levels: IntArray,
        weights: FloatArray,
        rules: Rules,
    ) -> None:
        self.types = types
        self.categories = categories
        self.levels = levels
        self.weights = weights
        self.rules = rules
        self.index = {t: i for i, t in enumerate(types)}
        self.scored_categories = list(rules.scored_categories)

    @classmethod
    def from_rules(cls, rules: Rules) -> _Catalog:
        types, categories, levels, weights = [], [], [], []
        for category, members in rules.catalog.items():
            if category == SYSTEM_CATEGORY:
                continue
            for event_type in members:
                level, weight = _TYPE_PROFILE.get(
                    event_type, (_CATEGORY_LEVEL.get(category, 1), 1.0)
                )
                types.append(event_type)
                categories.append(category)
                levels.append(level)
                weights.append(weight)
        return cls(
            types,
            categories,
            np.array(levels, dtype=np.int64),
            np.array(weights, dtype=np.float64),
            rules,
        )

    def draw(self, rng: np.random.Generator, tiers: IntArray) -> IntArray:
        """One event type index per entry of ``tiers``, from the types a user of that tier does."""
        out = np.empty(len(tiers), dtype=np.int64)
        u = rng.random(len(tiers))
        for tier in range(6):  # one pass per tier, vectorized inside
            mask = tiers == tier
            weights = np.where(self.levels <= tier, self.weights, 0.0)
            if weights.sum() == 0:
                weights = self.weights
            cdf = np.cumsum(weights) / weights.sum()
            out[mask] = np.minimum(np.searchsorted(cdf, u[mask], side="right"), len(cdf) - 1)
        return out


def _epoch_us(value: datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


def _segment_starts(counts: IntArray) -> IntArray:
    """Index of the first element of each segment when segments of ``counts`` are laid end to end."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _base_events(
    rng: np.random.Generator, users: int, catalog: _Catalog, days: int
) -> pl.DataFrame:
    """Sessions and their events for every user (no dirt, no bursts)."""
    # -- users: funnel tier, recency, span of activity, number of sessions
    tier = rng.choice(6, size=users, p=_TIER_SHARE).astype(np.int64)
    parts = rng.choice(len(_RECENCY), size=users, p=[r[0] for r in _RECENCY])
    low = np.array([r[1] for r in _RECENCY])[parts]
    high = np.array([r[2] for r in _RECENCY])[parts]
    scale = days / 120.0
    recency = (low + (high - low) * rng.random(users)) * scale  # days since the last session
    room = np.maximum(days - 0.05 - recency, 0.0)
    span = room * rng.random(users) ** 0.7
    sessions = 1 + np.floor(
        rng.pareto(_LOMAX_SHAPE, size=users) * _MEAN_SESSION_SCALE * (0.6 + 0.25 * tier)
    ).astype(np.int64)
    sessions = np.minimum(sessions, _MAX_SESSIONS)

    # -- sessions: owner, end time (the latest session of a user ends exactly at its recency)
    n_sessions = int(sessions.sum())
    owner = np.repeat(np.arange(users, dtype=np.int64), sessions)
    number = np.arange(n_sessions, dtype=np.int64) - np.repeat(_segment_starts(sessions), sessions)
    latest = number == 0
    end_days = recency[owner] + np.where(latest, 0.0, span[owner] * rng.random(n_sessions))
    end_us = (end_days * _DAY_US).astype(np.int64)
    anonymous = ~latest & (rng.random(n_sessions) < _ANONYMOUS_SESSION_SHARE)
    no_session_id = ~anonymous & (rng.random(n_sessions) < _NO_SESSION_ID_SHARE)
    source = rng.choice(len(_SOURCES), size=n_sessions, p=_SOURCE_SHARE)
    campaign = np.where(
        rng.random(n_sessions) < _CAMPAIGN_SESSION_SHARE,
        rng.integers(0, len(_CAMPAIGNS), size=n_sessions),
        -1,
    )

    # -- events: drawn types, plus the milestones of the user's tier in its latest session
    per_session = 1 + rng.poisson(_EXTRA_EVENTS_PER_SESSION, size=n_sessions)
    drawn_session = np.repeat(np.arange(n_sessions, dtype=np.int64), per_session)
    drawn_type = catalog.draw(rng, tier[owner[drawn_session]])
    milestone_session, milestone_type = [], []
    latest_session = np.flatnonzero(latest)
    for min_tier, milestone in _MILESTONES:  # a handful of fixed steps, vectorized inside
        if milestone not in catalog.index:
            continue
        chosen = latest_session[tier[owner[latest_session]] >= min_tier]
        milestone_session.append(chosen)
        milestone_type.append(np.full(len(chosen), catalog.index[milestone], dtype=np.int64))
    session = np.concatenate([drawn_session, *milestone_session])
    event_type = np.concatenate([drawn_type, *milestone_type])
    is_milestone = np.arange(len(session)) >= len(drawn_session)
    order = np.argsort(session, kind="stable")
    session, event_type, is_milestone = session[order], event_type[order], is_milestone[order]

    # Events of a session lie before its end, each at least _MIN_GAP_S after the previous one.
    n = len(session)
    gaps = ((_MIN_GAP_S + rng.exponential(_MEAN_EXTRA_GAP_S, size=n)) * _US).astype(np.int64)
    cumulative = np.cumsum(gaps)
    counts = np.bincount(session, minlength=n_sessions).astype(np.int64)
    starts = _segment_starts(counts)
    before = np.where(starts > 0, cumulative[np.maximum(starts - 1, 0)], 0)
    ago_us = end_us[session] + cumulative - np.repeat(before, counts)

    return _assemble(
        rng,
        catalog,
        user=owner[session],
        session_number=number[session],
        ago_us=ago_us,
        event_type=event_type,
        anonymous=anonymous[session],
        no_session_id=no_session_id[session],
        source=source[session],
        campaign=campaign[session],
        force_consent=is_milestone,
    )


# Metadata templates: prefix, first number, middle, second number, suffix (numbers may be absent).
_TEMPLATES: tuple[tuple[str, str, str], ...] = (
    ('{"duration_seconds": ', ', "scroll_depth_percent": ', "}"),  # 0 qualified type
    ('{"duration_seconds": ', "", "}"),  # 1 qualified type, no depth key (counts as 0)
    ('{"consent_recorded": true, "list": "weekly", "asset": "guide-', "", '"}'),  # 2
    ('{"consent_recorded": false, "list": "weekly", "asset": "guide-', "", '"}'),  # 3
    ('{"scroll_depth_percent": ', "", "}"),  # 4 scroll_depth_75
    ('{"video_id": "v', '", "percent_watched": ', "}"),  # 5 video_completion_75
    ('{"word_count": ', ', "duration_seconds": ', "}"),  # 6 long_form_completion
    ('{"landing_path": "/p/', "", '"}'),  # 7 utm_landing, affiliate_click
    ('{"target": "post-', "", '"}'),  # 8 content_share, referral_click, mention_tag
    ("{}", "", ""),  # 9 anything else
)
_TWO_NUMBERS = np.array([True, False, False, False, False, True, True, False, False, False])
_HAS_NUMBER = np.array([True] * 9 + [False])
_FIXED_TEMPLATE = {
    "scroll_depth_75": 4,
    "video_completion_75": 5,
    "long_form_completion": 6,
    "utm_landing": 7,
    "affiliate_click": 7,
    "content_share": 8,
    "referral_click": 8,
    "mention_tag": 8,
}


def _assemble(
    rng: np.random.Generator,
    catalog: _Catalog,
    *,
    user: IntArray,
    session_number: IntArray,
    ago_us: IntArray,
    event_type: IntArray,
    anonymous: BoolArray,
    no_session_id: BoolArray,
    source: IntArray,
    campaign: IntArray,
    force_consent: BoolArray,
    session_prefix: str = "s",
) -> pl.DataFrame:
    """Turn per-event arrays into text columns; metadata is JSON text from a template per type."""
    n = len(user)
    rules = catalog.rules
    # content_view duration and depth straddle the qualification thresholds (about half qualify).
    duration = np.round(rules.min_duration_seconds * rng.lognormal(0.0, 0.9, size=n)).astype(
        np.int64
    )
    depth = np.minimum(
        np.round(rules.min_scroll_depth_percent * rng.lognormal(0.0, 0.7, size=n)), 100
    ).astype(np.int64)
    consent = force_consent | (rng.random(n) < 0.9)
    no_depth_key = rng.random(n) < 0.15
    number = rng.integers(1, 5000, size=n)

    # Template per catalog type, then per event (sub-variants for the qualified and consent types).
    type_template = np.array(
        [
            0
            if t == rules.qualified_event_type
            else 2
            if c in rules.consent_categories
            else _FIXED_TEMPLATE.get(t, 9)
            for t, c in zip(catalog.types, catalog.categories, strict=True)
        ],
        dtype=np.int64,
    )
    template = type_template[event_type]
    template = np.where((template == 0) & no_depth_key, 1, template)
    template = np.where((template == 2) & ~consent, 3, template)
    first = np.select(
        [template <= 1, template <= 3, template == 4, template == 6],
        [duration, number % 40, 75 + number % 26, 1500 + number],
        default=number,
    )
    second = np.select(
        [template == 0, template == 5], [depth, 75 + number % 26], default=120 + 4 * duration
    )

    utm_types = [i for i, t in enumerate(catalog.types) if t in ("utm_landing", "affiliate_click")]
    campaign = np.where(
        campaign >= 0,
        campaign,
        np.where(np.isin(event_type, utm_types), rng.integers(0, len(_CAMPAIGNS), size=n), -1),
    )
    campaign_index = pl.Series(np.maximum(campaign, 0))
    utm = {
        name: pl.Series([c[i] for c in _CAMPAIGNS], dtype=pl.String).gather(campaign_index)
        for i, name in enumerate(
            ("utm_source", "utm_medium", "utm_campaign", "utm_content", "utm_term")
        )
    }
    template_index = pl.Series(template)

    def part(i: int) -> pl.Series:
        return pl.Series([t[i] for t in _TEMPLATES], dtype=pl.String).gather(template_index)

    frame = pl.DataFrame(
        {
            "user": user,
            "ago_us": ago_us,
            "anonymous": anonymous,
            "no_session_id": no_session_id,
            "session_number": session_number,
            "event_type": pl.Series(catalog.types, dtype=pl.String).gather(event_type),
            "event_category": pl.Series(catalog.categories, dtype=pl.String).gather(event_type),
            "event_source": pl.Series(_SOURCES, dtype=pl.String).gather(source),
            "has_campaign": campaign >= 0,
            **utm,
            "prefix": part(0),
            "middle": part(1),
            "suffix": part(2),
            "first": first,
            "second": second,
            "has_first": _HAS_NUMBER[template],
            "has_second": _TWO_NUMBERS[template],
        }
    )
    metadata = pl.concat_str(
        pl.col("prefix"),
        pl.when(pl.col("has_first")).then(pl.col("first").cast(pl.String)),
        pl.col("middle"),
        pl.when(pl.col("has_second")).then(pl.col("second").cast(pl.String)),
        pl.col("suffix"),
        ignore_nulls=True,
    )
    return frame.with_columns(
        session_id=pl.when(pl.col("no_session_id"))
        .then(None)
        .otherwise(
            pl.concat_str(
                pl.lit(session_prefix), pl.col("user"), pl.lit("."), pl.col("session_number")
            )
        ),
        metadata=metadata,
        **{name: pl.when(pl.col("has_campaign")).then(pl.col(name)) for name in utm},
    ).select(
        "user",
        "ago_us",
        "anonymous",
        *[c for c in EVENT_COLUMNS if c not in ("created_at", "user_id")],
    )


def _pick(rng: np.random.Generator, pool: IntArray, share: float) -> IntArray:
    """A random subset of ``pool``: ``share`` of it, at least _MIN_DIRTY rows when it has them."""
    size = min(len(pool), max(_MIN_DIRTY, round(share * len(pool))))
    return np.sort(rng.choice(pool, size=size, replace=False)) if size else pool[:0]


def _add_dirt(
    rng: np.random.Generator, events: pl.DataFrame, catalog: _Catalog, users: int, horizon_us: int
) -> pl.DataFrame:
    """Corrupt a few rows of each kind and append the spam users' hours."""
    rules = catalog.rules
    n = events.height
    event_type = events["event_type"].to_numpy()
    category = events["event_category"].to_numpy()
    consent_pool = np.flatnonzero(np.isin(category, list(rules.consent_categories)))
    other_pool = np.flatnonzero(~np.isin(category, list(rules.consent_categories)))
    rng.shuffle(other_pool)
    quarter = len(other_pool) // 4
    malformed = _pick(
        rng, np.flatnonzero(event_type == rules.qualified_event_type), _MALFORMED_SHARE
    )
    malformed = np.union1d(malformed, _pick(rng, other_pool[:quarter], _MALFORMED_SHARE / 4))
    unknown_category = _pick(rng, other_pool[quarter : 2 * quarter], _UNKNOWN_CATEGORY_SHARE)
    unknown_type = _pick(rng, other_pool[2 * quarter : 3 * quarter], _UNKNOWN_TYPE_SHARE)
    wrong_category = _pick(rng, other_pool[3 * quarter :], _WRONG_CATEGORY_SHARE)
    malformed = np.setdiff1d(
        malformed, np.concatenate([unknown_category, unknown_type, wrong_category])
    )
    no_consent = _pick(rng, consent_pool, _NO_CONSENT_SHARE)

    def flag(rows: IntArray) -> pl.Series:
        mask = np.zeros(n, dtype=np.bool_)
        mask[rows] = True
        return pl.Series(mask)

    cats = catalog.scored_categories
    shifted = {c: cats[(i + 1) % len(cats)] for i, c in enumerate(cats)}
    first_category = cats[0]
    dirty = (
        events.with_columns(
            _malformed=flag(malformed),
            _unknown_category=flag(unknown_category),
            _unknown_type=flag(unknown_type),
            _wrong_category=flag(wrong_category),
            _no_consent=flag(no_consent),
            _variant=pl.Series(np.arange(n) % len(_MALFORMED_METADATA)),
        )
        .with_columns(
            event_type=pl.when(pl.col("_unknown_category"))
            .then(pl.lit(UNKNOWN_CATEGORY_EVENT_TYPE))
            .when(pl.col("_unknown_type"))
            .then(pl.lit(UNKNOWN_EVENT_TYPE))
            .otherwise(pl.col("event_type")),
            event_category=pl.when(pl.col("_unknown_category"))
            .then(pl.lit(UNKNOWN_CATEGORY))
            .when(pl.col("_unknown_type"))
            .then(pl.lit(first_category))
            .when(pl.col("_wrong_category"))
            .then(pl.col("event_category").replace_strict(shifted))
            .otherwise(pl.col("event_category")),
            metadata=pl.when(pl.col("_malformed"))
            .then(
                pl.col("_variant").replace_strict(
                    dict(enumerate(_MALFORMED_METADATA)), return_dtype=pl.String
                )
            )
            .when(pl.col("_no_consent") & (pl.col("_variant") % 2 == 0))
            .then(pl.lit('{"list": "weekly"}'))
            .when(pl.col("_no_consent"))
            .then(pl.lit('{"consent_recorded": "yes", "list": "weekly"}'))
            .otherwise(pl.col("metadata")),
        )
        .drop(pl.selectors.starts_with("_"))
    )
    return pl.concat([dirty, _spam(rng, catalog, users, horizon_us)])


def _spam(rng: np.random.Generator, catalog: _Catalog, users: int, horizon_us: int) -> pl.DataFrame:
    """A few users who each fire 560-700 events within one hour, 4.5-5 s apart."""
    spammers = rng.choice(users, size=min(users, max(2, users // 25_000)), replace=False)
    counts = rng.integers(560, 701, size=len(spammers)).astype(np.int64)
    user = np.repeat(spammers.astype(np.int64), counts)
    step = np.arange(len(user), dtype=np.int64) - np.repeat(_segment_starts(counts), counts)
    end_us = rng.integers(0, max(horizon_us - 2 * 3600 * _US, 1), size=len(spammers))
    ago_us = (
        np.repeat(end_us, counts)
        + step * int(_SPAM_SPACING_S * _US)
        + rng.integers(0, _US // 2, size=len(user))
    )
    n = len(user)
    return _assemble(
        rng,
        catalog,
        user=user,
        session_number=step // 20,
        ago_us=ago_us,
        event_type=rng.integers(0, len(catalog.types), size=n).astype(np.int64),
        anonymous=np.zeros(n, dtype=np.bool_),
        no_session_id=np.zeros(n, dtype=np.bool_),
        source=np.zeros(n, dtype=np.int64),
        campaign=np.full(n, -1, dtype=np.int64),
        force_consent=np.ones(n, dtype=np.bool_),
        session_prefix="x",
    )


def _space_out(events: pl.DataFrame) -> pl.DataFrame:
    """Drop any event less than 4 s after the previous one of its (user, type, session) group.

    Events of one session are already that far apart; this removes the rare collisions between
    sessions without a session id (and rows changed by the dirt). One pass suffices: a kept event
    is >= 4 s after its raw predecessor, so also after the nearest kept one.
    """
    key = [pl.col("anonymous"), pl.col("user"), pl.col("event_type"), pl.col("session_id")]
    same_group = pl.all_horizontal([k.eq_missing(k.shift()) for k in key]) & (
        pl.int_range(pl.len()) > 0
    )
    too_close = (pl.col("ago_us").shift() - pl.col("ago_us")) < int(_MIN_GAP_S * _US)
    return (
        events.with_columns(pl.col("user").alias("user_key"))
        .with_columns(user=pl.when(pl.col("anonymous")).then(-1).otherwise(pl.col("user")))
        .sort(
            ["anonymous", "user", "event_type", "session_id", "ago_us"],
            descending=[False, False, False, False, True],
            nulls_last=True,
        )
        .filter(~(same_group & too_close).fill_null(False))
        .with_columns(user=pl.col("user_key"))
        .drop("user_key")
    )


def _add_bursts(rng: np.random.Generator, events: pl.DataFrame) -> pl.DataFrame:
    """Repeat a few events 2-10 times, each copy 0.25-2.9 s before the previous one."""
    n = events.height
    heads = np.flatnonzero(rng.random(n) < _BURST_SHARE)
    copies = np.minimum(2 + rng.poisson(2.0, size=len(heads)), 10).astype(np.int64)
    source = np.repeat(heads, copies)
    gaps = rng.integers(_US // 4, int(2.9 * _US), size=len(source))
    cumulative = np.cumsum(gaps)
    starts = _segment_starts(copies)
    before = np.where(starts > 0, cumulative[np.maximum(starts - 1, 0)], 0)
    offset = cumulative - np.repeat(before, copies)
    burst = events[source].with_columns(pl.col("ago_us") + pl.Series(offset))
    return pl.concat([events, burst])
