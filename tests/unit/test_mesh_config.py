import os
import stat

import pytest
import yaml

from robustdice.mesh import cli
from robustdice.mesh.config import load_peers, parse_peers, resolve_self, write_peers
from robustdice.mesh.errors import ConfigError
from robustdice.mesh.keys import make_keypairs

K0 = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
K1 = "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID"
K2 = "JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6"


def base(**over):
    data = {"version": 1, "plan": "plan/", "secret_key_file": "keys/{id}.key_secret",
            "peers": [{"id": "n0", "host": "127.0.0.1", "port": 5550, "public_key": K0},
                      {"id": "n1", "host": "127.0.0.1", "port": 5560, "public_key": K1},
                      {"id": "n2", "host": "10.0.0.3", "port": 5550, "public_key": K2}]}
    data.update(over)
    return data


def error_of(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_peers(data)
    return str(info.value)


def test_defaults_and_paths(tmp_path):
    path = tmp_path / "peers.yaml"
    path.write_text(yaml.safe_dump(base()))
    config = load_peers(path)
    assert (config.heartbeat_interval_ms, config.peer_timeout_ms, config.sync_timeout_ms,
            config.frame_timeout_ms) == (100, 500, 1000, 10000)
    assert config.insecure is False and config.max_message_bytes == 268435456
    assert config.plan == tmp_path / "plan"
    assert config.peer("n1").client_port == 5561
    assert config.peer("n1").metrics_port is None and config.peer("n1").metrics_address is None  # off by default
    assert config.secret_key_path("n2") == tmp_path / "keys" / "n2.key_secret"


def test_to_yaml_roundtrip(tmp_path):
    data = base(clients=[{"name": "ops", "public_key": K2}], sync_timeout_ms=50)
    data["peers"][2]["metrics_port"] = 9100
    config = parse_peers(data, tmp_path)
    again = load_peers(write_peers(tmp_path / "p.yaml", config))
    assert again.peers == config.peers and again.clients == config.clients and again.sync_timeout_ms == 50
    assert again.peer("n2").metrics_port == 9100 and again.peer("n0").metrics_port is None


def test_metrics_port_binds_the_peers_address_or_every_interface():
    data = base()
    data["peers"][2].update(metrics_port=9100)
    data["peers"].append({"id": "n3", "host": "board-3.local", "port": 5550, "public_key": K0[::-1],
                          "metrics_port": 9100})
    config = parse_peers(data)
    assert config.peer("n2").metrics_address == ("10.0.0.3", 9100)
    assert config.peer("n3").metrics_address == ("0.0.0.0", 9100)   # a name: every interface


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["peers"][2].update(port=70000), "peers[2].port: 70000 is not a port (1-65535)"),
    (lambda d: d["peers"][1].update(port="x"), "peers[1].port: 'x' is not an integer"),
    (lambda d: d["peers"][1].update(id="n0"), "peers[1].id: 'n0' is a duplicate"),
    (lambda d: d["peers"][1].update(port=5551), "peers[1].port: 127.0.0.1:5551 is already used by peers[0].client_port"),
    (lambda d: d["peers"][1].update(client_port=5550), "peers[1].client_port: 127.0.0.1:5550 is already used"),
    (lambda d: d["peers"][0].update(colour="red"), "peers[0]: unknown key(s) colour"),
    (lambda d: d["peers"][2].update(metrics_port=0), "peers[2].metrics_port: 0 is not a port (1-65535)"),
    (lambda d: d["peers"][2].update(metrics_port="9100"), "peers[2].metrics_port: '9100' is not an integer"),
    (lambda d: d["peers"][2].update(metrics_port=True), "peers[2].metrics_port: True is not an integer"),
    (lambda d: d["peers"][1].update(metrics_port=5551),
     "peers[1].metrics_port: 127.0.0.1:5551 is already used by peers[0].client_port"),
    (lambda d: d["peers"][1].update(metrics_port=5560),
     "peers[1].metrics_port: 127.0.0.1:5560 is already used by peers[1].port"),
    (lambda d: d.update(heartbeat_ms=5), "peers.yaml: unknown key(s) heartbeat_ms"),
    (lambda d: d["peers"][1].pop("public_key"), "peers[1].public_key: missing"),
    (lambda d: d["peers"][1].update(public_key="short"), "peers[1].public_key: 'short' is not a 40-character Z85"),
    (lambda d: d["peers"][1].update(public_key=K0), "is listed for more than one peer"),
    (lambda d: d.update(peer_timeout_ms=100, heartbeat_interval_ms=100), "peer_timeout_ms: 100 must exceed heartbeat_interval_ms (100)"),
    (lambda d: d.update(sync_timeout_ms=0), "sync_timeout_ms: 0 is not"),
    (lambda d: d.update(frame_timeout_ms=900), "frame_timeout_ms: 900 must exceed sync_timeout_ms (1000)"),
    (lambda d: d.update(insecure="yes"), "insecure: 'yes' is not true or false"),
    (lambda d: d.update(device="cuda"), "device: is now compute:"),
    (lambda d: d.update(compute="gpu"), "compute: 'gpu' is not one of auto, cpu, cuda"),
    (lambda d: d.update(version=2), "version: 2 is not supported"),
    (lambda d: d.update(peers=[]), "peers: [] is not a non-empty list"),
    (lambda d: d.pop("secret_key_file"), "secret_key_file: missing"),
    (lambda d: d.update(clients=[{"name": "ops"}]), "clients[0].public_key: None is not"),
    (lambda d: d["peers"][0].update(host=""), "peers[0].host: '' is not a non-empty string"),
])
def test_errors_name_field_and_value(mutate, expected):
    data = base()
    mutate(data)
    assert expected in error_of(data)


def test_insecure_needs_no_keys():
    data = base(insecure=True)
    data.pop("secret_key_file")
    for p in data["peers"]:
        p.pop("public_key")
    assert parse_peers(data).insecure


def test_insecure_is_logged_as_warning(tmp_path, caplog):
    path = tmp_path / "peers.yaml"
    path.write_text(yaml.safe_dump(base(insecure=True)))
    load_peers(path)
    assert any(r.levelname == "WARNING" and "insecure" in r.message for r in caplog.records)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_peers(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("peers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_peers(tmp_path / "bad.yaml")


def test_resolve_self():
    config = parse_peers(base())
    assert resolve_self(config, "n2").host == "10.0.0.3"
    with pytest.raises(ConfigError, match="'n9' is not in peers"):
        resolve_self(config, "n9")
    with pytest.raises(ConfigError, match="ambiguous, peers n0, n1"):
        resolve_self(config)  # two peers on 127.0.0.1
    only_remote = base()
    only_remote["peers"] = [dict(only_remote["peers"][0], host="192.0.2.77"), only_remote["peers"][2]]
    with pytest.raises(ConfigError, match="no peer's host"):
        resolve_self(parse_peers(only_remote))
    one_local = base()
    one_local["peers"] = [one_local["peers"][0], dict(one_local["peers"][2], host="192.0.2.77")]
    assert resolve_self(parse_peers(one_local)).id == "n0"


def test_keypairs_and_cli(tmp_path, capsys):
    import argparse
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["keys", "--out", str(tmp_path / "k"), "--ids", "a,b"])
    assert args.func(args) == 0
    fragment = yaml.safe_load(capsys.readouterr().out)
    assert [p["id"] for p in fragment["peers"]] == ["a", "b"]
    for node_id in ("a", "b"):
        secret = tmp_path / "k" / f"{node_id}.key_secret"
        assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert (tmp_path / "k" / f"{node_id}.key").exists()
    keys = [p["public_key"] for p in fragment["peers"]]
    assert len(set(keys)) == 2 and all(len(k) == 40 for k in keys)
    fragment["peers"][0]["host"] = fragment["peers"][1]["host"] = "127.0.0.1"
    parse_peers(fragment)  # the printed fragment is a valid peers.yaml once hosts are filled in


def test_make_keypairs_rejects_path_ids_and_overwrites(tmp_path):
    with pytest.raises(ConfigError):
        make_keypairs(tmp_path, ["../evil"])
    make_keypairs(tmp_path, ["a"])
    before = (tmp_path / "a.key_secret").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_keypairs(tmp_path, ["a"])
    assert (tmp_path / "a.key_secret").read_bytes() == before
