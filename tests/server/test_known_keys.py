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
