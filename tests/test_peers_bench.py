"""bench/peers.py as the benchmarks use it: the versions a result file records name each usable peer and
carry no path of the machine, and a machine without the peers (or without a GPU) says why for each."""
import torch

import bench_script
from sage_attention_pack.sage_core import bench


def test_versions_name_each_usable_peer_without_its_path():
    peers = bench_script.load("peers")
    found = peers.PeerSet()
    found["sa1_triton"] = found["ck_int8"] = lambda q, k, v, is_causal=False: q
    found.sources["sa1_triton"] = "$SAGE_PEER_SA1_SITE: /opt/peers/sa1/sageattention (version 1.0.6)"
    found.sources["ck_int8"] = "importable: /usr/lib/python3/comfy_kitchen (version 0.2.40)"
    found.sources["sa2_fp8_sm90"] = "$SAGE_PEER_SA2_SITE: /opt/sa2/sageattention (version 2.2.0)"  # not usable
    versions = found.versions()
    assert versions == {"sa1_triton": "1.0.6", "ck_int8": "0.2.40"}
    assert not any("/" in v for v in versions.values())


def test_load_peers_names_why_each_missing_peer_is_missing(monkeypatch):
    for var in ("SAGE_PEER_SA1_SITE", "SAGE_PEER_SA2_SITE", "SAGE_PEER_CK_SITE"):
        monkeypatch.delenv(var, raising=False)
    found, missing, versions = bench.load_peers()
    assert set(versions) == set(found)
    names = bench_script.load("peers").PEER_NAMES
    assert set(found) | set(missing) == set(names)
    assert all(isinstance(why, str) and why for why in missing.values())
    if not torch.cuda.is_available():
        assert found == {} and versions == {}
