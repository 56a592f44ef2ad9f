"""Issue 25, item 9: the largest message a node takes comes from its plan, not a flat 256 MiB:
the plan's largest slice (rows x values per neuron and image) for the largest batch, or the
largest input, plus headers, at least MIN_MESSAGE_BYTES; logged at start-up. A value set in
peers.yaml still wins. The engine measures the values per neuron and image (it has the model);
the handler derives the bound when the engine reports them, right after its READY."""
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
import node_helpers as nh  # noqa: E402

from robustdice.mesh import wire  # noqa: E402
from robustdice.mesh.config import parse_peers  # noqa: E402
from robustdice.node import ipc  # noqa: E402
from robustdice.mesh.gather import DEFAULT_MAX_EARLY_BYTES, DEFAULT_MAX_EARLY_SLICES  # noqa: E402
from robustdice.node.config import (MAX_EARLY_BYTES, MIN_MESSAGE_BYTES, load_node_config, plan_early_bounds,  # noqa: E402
                                   plan_message_bytes)
from robustdice.node.engine import Engine  # noqa: E402
from robustdice.node.handler import MAX_BATCH, Handler  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.partitioner.core.plan import load_plan  # noqa: E402

DEVICE = 1


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory):
    nh.start_pyzmq_gc()
    return nh.make_plan(tmp_path_factory, "digits_cnn", 4, "robust")


def test_the_engine_measures_what_one_neurons_row_holds_per_image(digits_plan):
    engine = Engine(str(digits_plan), DEVICE)
    elements = engine.row_elements()
    assert len(elements) == len(engine.plan.stages)
    x = torch.zeros((3, 1, 8, 8))
    header, _ = engine.handle({"kind": ipc.INPUT, "frame": 1, "alone": False, **ipc.describe(x.numpy())}, [x.numpy()])
    assert header["shape"][1] == 3 and int(np.prod(header["shape"][2:])) == elements[0]
    assert elements[-1] == 1   # the classifier: one value per neuron and image


def test_the_bound_is_the_largest_slice_for_the_largest_batch_with_a_floor(digits_plan):
    plan = load_plan(digits_plan)
    small = [1] * len(plan.stages)
    assert plan_message_bytes(plan, small, MAX_BATCH, "float32") == (MIN_MESSAGE_BYTES, "floor")
    big = [1] * len(plan.stages)
    big[0] = 10_000
    rows = max(len(plan.stages[0].holders(d)) for d in range(plan.devices))
    nbytes, why = plan_message_bytes(plan, big, MAX_BATCH, "float32")
    assert nbytes == wire.MAX_HEADER_BYTES + rows * (4 + MAX_BATCH * 10_000 * 4)
    assert plan.stages[0].name in why
    # float16 on the wire halves the payload
    assert plan_message_bytes(plan, big, MAX_BATCH, "float16")[0] == wire.MAX_HEADER_BYTES + rows * (
        4 + MAX_BATCH * 10_000 * 2)


def peers_yaml(**extra):
    return dict(insecure=True, peers=[{"id": "n0", "host": "127.0.0.1", "port": 5000}], **extra)


def test_an_explicit_peers_yaml_value_is_kept_and_written_back():
    assert not parse_peers(peers_yaml()).max_message_bytes_given
    assert "max_message_bytes" not in parse_peers(peers_yaml()).to_dict()
    given = parse_peers(peers_yaml(max_message_bytes=4096))
    assert given.max_message_bytes_given and given.to_dict()["max_message_bytes"] == 4096
    assert parse_peers(given.to_dict()).max_message_bytes_given


@pytest.mark.usefixtures("leak_check")
@pytest.mark.parametrize("explicit", [False, True], ids=["derived", "peers.yaml"])
def test_the_handler_bounds_its_mesh_when_the_engine_reports_and_logs_it(digits_plan, tmp_path, caplog, explicit):
    plan = load_plan(digits_plan)
    row_elements = [10_000] + [1] * (len(plan.stages) - 1)   # as if stage 0 were 100 x 100
    expected, _ = plan_message_bytes(plan, row_elements, MAX_BATCH, "float32")
    with LocalCluster(digits_plan, tmp_path / "cluster") as cluster:   # keys and peers.yaml; no node runs
        if explicit:
            cluster.peers_path.write_text(cluster.peers_path.read_text() + "max_message_bytes: 5000000\n")
            expected = 5_000_000
        config = load_node_config(cluster.peers_path, cluster.ids[DEVICE])
        endpoint = f"ipc://{tmp_path}/engine.sock"
        handler = Handler(config, endpoint)
        handler.start()
        context = zmq.Context()
        engine = context.socket(zmq.DEALER)
        engine.linger = 0
        try:
            assert handler.mesh.config.max_message_bytes == (5_000_000 if explicit else wire.DEFAULT_MAX_MESSAGE_BYTES)
            engine.connect(endpoint)
            engine.send(ipc.READY)
            telemetry = {"kind": "telemetry", "device": "cpu", "dtype": "float32", "row_elements": row_elements}
            engine.send_multipart(ipc.pack(ipc.RESULTS, [(telemetry, [])]))
            with caplog.at_level(logging.INFO, logger="robustdice.handler"):
                nh.wait_for(lambda: handler.step(time.monotonic()) or handler.engine_telemetry.get("device") == "cpu",
                            10, "the engine's first telemetry", interval_s=0.001)
            assert "row_elements" not in handler.engine_telemetry
            assert handler.mesh.config.max_message_bytes == expected
            assert handler.mesh.pull_socket.getsockopt(zmq.MAXMSGSIZE) == expected
            logged = [r.getMessage() for r in caplog.records if "max_message_bytes" in r.getMessage()]
            assert len(logged) == 1 and str(expected) in logged[0], logged
            assert ("peers.yaml" in logged[0]) == explicit
            # Either way the mesh holds what its frames in flight need of early slices (issue 26):
            # every peer one stage ahead on each of 4 origins x 32 frames, the largest slice each.
            rows = max(len(plan.stages[0].holders(d)) for d in range(plan.devices))
            slices, nbytes = plan_early_bounds(plan, row_elements, handler.book.max_per_origin * 4, "float32")
            assert (slices, nbytes) == (128 * 3, min(MAX_EARLY_BYTES, 128 * 3 * rows * (4 + 10_000 * 4)))
            assert handler.mesh.book.max_early_slices == max(DEFAULT_MAX_EARLY_SLICES, slices)
            assert handler.mesh.book.max_early_bytes == max(DEFAULT_MAX_EARLY_BYTES, nbytes) > DEFAULT_MAX_EARLY_BYTES
        finally:
            engine.close(0)
            context.term()
            handler.close()
