from robustdice.mesh.transport import ZapPolicy

POLICY = ZapPolicy({"mesh": {"KEYA": "a"}, "client": {"KEYA": "a", "KEYOPS": "ops"}})


def test_peer_keys_are_admitted_on_both_domains():
    assert POLICY.decide("mesh", "CURVE", "KEYA") == (True, "a")
    assert POLICY.decide("client", "CURVE", "KEYA") == (True, "a")


def test_client_keys_only_on_the_client_domain():
    assert POLICY.decide("client", "CURVE", "KEYOPS") == (True, "ops")
    assert POLICY.decide("mesh", "CURVE", "KEYOPS")[0] is False


def test_unlisted_key_plaintext_and_unknown_domain_refused():
    assert POLICY.decide("mesh", "CURVE", "OTHER")[0] is False
    assert POLICY.decide("mesh", "NULL", None)[0] is False
    assert POLICY.decide("nope", "CURVE", "KEYA")[0] is False
