"""Two "hosts" on one machine: producers bound on 127.0.0.2, a trainer connecting from 127.0.0.3
(ZeroMQ's ``tcp://source;destination`` form), each producer with its own CURVE key pair. Only the
producer whose key is on the allow-list delivers anything."""

import sys
import time

from test_trainer_dist import COMMON, _start, _stop, _train_logs, _trainer

from edsam_online.runtime import free_port
from edsam_online.security import generate_keys

PRODUCER_HOST, TRAINER_HOST = "127.0.0.2", "127.0.0.3"


def test_producers_on_one_address_trainer_on_another_and_an_unknown_key_delivers_nothing(tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys, ["producer-0"])
    generate_keys(keys, ["producer-1"], allow=False)
    ports = [free_port(), free_port()]
    run_dir = tmp_path / "run"
    producers = [
        _start([sys.executable, "-m", "producers", *COMMON, f"run_dir={run_dir}",
                f"stream.endpoints=['tcp://{PRODUCER_HOST}:{ports[rank]}']", f"producer.rank={rank}",
                "producer.num_producers=2", "producer.endpoint_index=0", "producer.batch_size=2",
                "logging.log_every=1000", "stream.curve=true",
                f"stream.curve_server_public={keys}/receiver.key",
                f"stream.curve_client_secret={keys}/producers/producer-{rank}.key_secret"],
               tmp_path / f"producer{rank}.log")
        for rank in (0, 1)]
    endpoints = ",".join(f"'tcp://{TRAINER_HOST}:0;{PRODUCER_HOST}:{p}'" for p in ports)
    trainer = None
    try:
        trainer = _trainer(1, [f"run_dir={run_dir}", f"stream.endpoints=[{endpoints}]", "trainer.steps=100000",
                               "trainer.batch_size=4", "mix.extra_share=0.5", "mix.extra_wait_s=0.5",
                               "buffer.min_size_to_sample=2", "buffer.samples_per_insert=0", "stream.curve=true",
                               f"stream.curve_server_secret={keys}/receiver.key_secret",
                               f"stream.curve_allow_dir={keys}/allowed"],
                           tmp_path / "trainer.log")
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (_last(run_dir, "train/extra_samples")
                                                   and _last(run_dir, "buffer/auth_failures")):
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-4000:]
            time.sleep(0.2)
        time.sleep(3)  # time for a second session to show, if one could
    finally:
        for p in producers:
            _stop(p)
        if trainer is not None:
            _stop(trainer)
    assert _last(run_dir, "train/extra_samples") > 0 and _last(run_dir, "buffer/accepted") > 0
    assert _last(run_dir, "buffer/sessions") == 1  # producer-0 only
    assert _last(run_dir, "buffer/auth_failures") >= 1  # producer-1's handshakes, refused
    assert _last(run_dir, "buffer/dropped") == 0


def _last(run_dir, key: str) -> float:
    logs = _train_logs(run_dir, 0)
    return logs[-1].get(key, 0) if logs else 0
