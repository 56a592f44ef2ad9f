"""Secret keys are kept like ssh's: a key open to group or others is refused with the chmod
that mends it, and the folder the keys are made in is the owner's alone (0700)."""
import os
import stat

import pytest

from robustdice.mesh.config import parse_peers
from robustdice.mesh.errors import ConfigError
from robustdice.mesh.keys import load_own_keys, load_secret, make_keypairs


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    # The usual login umask, under which a plain mkdir would give 0755.
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o601], ids=lambda mode: f"{mode:04o}")
def test_a_secret_key_open_to_group_or_others_is_refused_with_the_chmod_to_run(tmp_path, mode):
    make_keypairs(tmp_path / "keys", ["n0"])
    secret = tmp_path / "keys" / "n0.key_secret"
    os.chmod(secret, mode)
    with pytest.raises(ConfigError) as caught:
        load_secret(secret)
    message = str(caught.value)
    assert str(secret) in message and f"{mode:04o}" in message, message
    assert f"chmod 600 {secret}" in message, message
    os.chmod(secret, 0o600)  # what the message says to run is enough
    public, secret_key = load_secret(secret)
    assert len(public) == 40 and len(secret_key) == 40


def test_a_secret_key_readable_by_its_owner_alone_loads(tmp_path):
    make_keypairs(tmp_path / "keys", ["n0"])
    secret = tmp_path / "keys" / "n0.key_secret"
    for mode in (0o600, 0o400):
        os.chmod(secret, mode)
        assert load_secret(secret)[1] is not None


def test_a_node_refuses_its_own_key_when_others_can_read_it(tmp_path):
    """load_own_keys is what a node calls at start (and `robustdice-node --check`)."""
    publics = make_keypairs(tmp_path / "keys", ["n0", "n1"])
    config = parse_peers({"version": 1, "secret_key_file": "keys/{id}.key_secret",
                          "peers": [{"id": node_id, "host": "127.0.0.1", "port": 5550 + 2 * n, "public_key": key}
                                    for n, (node_id, key) in enumerate(publics.items())]}, base_dir=tmp_path)
    assert load_own_keys(config, "n1")[0].decode() == publics["n1"]
    os.chmod(tmp_path / "keys" / "n1.key_secret", 0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {tmp_path}/keys/n1.key_secret"):
        load_own_keys(config, "n1")


def test_a_missing_key_is_still_named_as_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot load .*nope.key_secret"):
        load_secret(tmp_path / "nope.key_secret")


def test_keys_folder_is_made_0700(tmp_path, umask_022):
    make_keypairs(tmp_path / "new" / "keys", ["n0"])
    assert mode_of(tmp_path / "new" / "keys") == 0o700
    assert mode_of(tmp_path / "new" / "keys" / "n0.key_secret") == 0o600


def test_an_existing_keys_folder_of_ours_is_closed_to_0700(tmp_path, umask_022):
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o755)
    assert mode_of(folder) == 0o755
    make_keypairs(folder, ["n0"])
    assert mode_of(folder) == 0o700
