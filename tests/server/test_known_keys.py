"""Keys verified recently keep working while the store is unreachable; everything else gets 503."""

from __future__ import annotations

import pytest

from prefix_store.store import StoreUnavailable
from server.auth import KnownKeys, authenticate, hash_key, new_key
from server.errors import ServiceError


class FlakyStore:
    def __init__(self) -> None:
        self.records: dict = {}
        self.is_down = False

    def get_key(self, key_id: str):
        if self.is_down:
            raise StoreUnavailable("redis://127.0.0.1:1 is down")
        return self.records.get(key_id)


def test_recent_key_survives_an_outage_unknown_key_gets_503():
    store, known = FlakyStore(), KnownKeys()
    record, key = new_key("acme")
    other_record, other_key = new_key("beta")
    store.records = {record.key_id: record, other_record.key_id: other_record}
    assert authenticate(f"Bearer {key}", "admin", store, known).tenant == "acme"
    store.is_down = True
    assert authenticate(f"Bearer {key}", "admin", store, known).tenant == "acme"
    with pytest.raises(ServiceError) as err:
        authenticate(f"Bearer {other_key}", "admin", store, known)
    assert err.value.status == 503
    with pytest.raises(ServiceError) as err:  # a wrong secret for a known key id is still refused
        authenticate(f"Bearer {key[:-3]}xyz", "admin", store, known)
    assert err.value.status == 401
    known.forget(record.key_id)  # revoked through this replica
    with pytest.raises(ServiceError):
        authenticate(f"Bearer {key}", "admin", store, known)
    assert hash_key(key) == record.key_hash


def test_grace_ends_after_key_grace_seconds(monkeypatch: pytest.MonkeyPatch):
    """The grace is a setting (--key-grace-seconds): checked with a fake clock instead of waiting 10 minutes."""
    import server.auth

    now = [1000.0]
    monkeypatch.setattr(server.auth.time, "monotonic", lambda: now[0])
    store, known = FlakyStore(), KnownKeys(grace_seconds=600.0)
    record, key = new_key("acme")
    store.records = {record.key_id: record}
    assert authenticate(f"Bearer {key}", "admin", store, known).tenant == "acme"
    store.is_down = True
    now[0] += 599.0
    assert authenticate(f"Bearer {key}", "admin", store, known).tenant == "acme"
    now[0] += 1.0  # 600 s after the last successful check in the store
    with pytest.raises(ServiceError) as err:
        authenticate(f"Bearer {key}", "admin", store, known)
    assert err.value.status == 503
    # a grace of 0 turns the fallback off
    store.is_down, none = False, KnownKeys(grace_seconds=0.0)
    authenticate(f"Bearer {key}", "admin", store, none)
    store.is_down = True
    with pytest.raises(ServiceError) as err:
        authenticate(f"Bearer {key}", "admin", store, none)
    assert err.value.status == 503


def test_key_grace_seconds_is_a_setting():
    from server.cli import settings_from_args

    assert settings_from_args([]).key_grace_seconds == 600.0
    assert settings_from_args(["--key-grace-seconds", "2.5"]).key_grace_seconds == 2.5


def test_key_the_store_no_longer_has_is_not_accepted_in_a_later_outage():
    """Revoked through another replica: this one sees the key gone in the store and must forget it, or the
    revoked key would work again here as soon as the store became unreachable."""
    store, known = FlakyStore(), KnownKeys()
    record, key = new_key("acme")
    store.records = {record.key_id: record}
    assert authenticate(f"Bearer {key}", "admin", store, known).tenant == "acme"
    del store.records[record.key_id]  # revoked on another replica
    with pytest.raises(ServiceError) as err:
        authenticate(f"Bearer {key}", "admin", store, known)
    assert err.value.status == 401
    store.is_down = True
    with pytest.raises(ServiceError) as err:
        authenticate(f"Bearer {key}", "admin", store, known)
    assert err.value.status == 503


def test_store_timeout_is_a_setting_with_an_env_twin(monkeypatch: pytest.MonkeyPatch):
    from prefix_store.redis import DEFAULT_TIMEOUT
    from prefix_store.store import open_store
    from server.cli import settings_from_args

    assert settings_from_args([]).store_timeout == DEFAULT_TIMEOUT
    assert settings_from_args(["--store-timeout", "0.75"]).store_timeout == 0.75
    monkeypatch.setenv("PREFIXSERVE_STORE_TIMEOUT", "5")
    assert settings_from_args([]).store_timeout == 5.0
    store = open_store("redis://127.0.0.1:1/0", 0.75, grace_seconds=30.0)  # nothing connects yet
    assert (store.timeout, store.grace_seconds) == (0.75, 30.0)  # type: ignore[attr-defined]
    store.close()
