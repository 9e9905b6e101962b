"""list_methods / get_method / LayerMethods / config objects."""

import dataclasses

import pytest
import torch

import sparseattn.methods as M
from sparseattn.methods import LayerMethods, get_method, list_methods


def test_list_methods_by_kind():
    names = list_methods()
    assert names[:5] == ["dense", "streaming", "tri_shape", "block_topk", "xattention"]
    assert {"power", "moa", "duo", "flexprefill", "vertical_slash"} <= set(names)
    decode = list_methods("decode")
    assert decode[:3] == ["dense", "streaming", "quest"]
    with pytest.raises(ValueError, match="kind must be one of"):
        list_methods("training")


def test_prefill_and_decode_methods_share_names_but_not_kinds():
    assert type(get_method("streaming")).kind == "prefill"
    d = get_method("streaming", kind="decode", window=64)
    assert type(d).kind == "decode" and d.window == 64 and hasattr(d, "select")
    assert get_method(d, kind="decode", sink=2).sink == 2
    with pytest.raises(ValueError, match="is a decode method: pass kind='decode'"):
        get_method("quest")
    with pytest.raises(ValueError, match="is a decode method, but kind='prefill'"):
        get_method(d)
    layers = LayerMethods({"default": "quest", "layers": {0: "dense"}}, kind="decode")
    assert layers.for_layer(0).name == "dense" and type(layers.for_layer(0)).kind == "decode"
    assert layers.for_layer(5).name == "quest"
    with pytest.raises(ValueError, match="cannot serve"):
        LayerMethods(layers)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError, match="xattention"):
        get_method("xatention")
    with pytest.raises(ValueError, match="name"):
        get_method(3)


def test_official_defaults():
    x = get_method("xattention")
    assert (x.stride, x.threshold, x.block_size, x.norm, x.sink_blocks, x.keep_diagonal) == (8, 0.9, 128, 1.0, 1, True)
    s = get_method("streaming")
    assert (s.sink, s.window) == (128, 3968)
    f = get_method("flexprefill")
    assert (f.gamma, f.tau, f.block_size, f.min_budget) == (0.9, 0.1, 128, None)
    vs = get_method("vertical_slash")
    assert (vs.vertical_size, vs.slash_size, vs.last_q, vs.block_size) == (1000, 6096, 64, 64)
    assert get_method("block_topk").topk == 100


def test_overrides_and_copies():
    x = get_method("xattention", threshold=0.95, stride=16)
    assert (x.threshold, x.stride) == (0.95, 16)
    y = get_method(x, threshold=0.5)
    assert y.threshold == 0.5 and x.threshold == 0.95
    assert get_method(x) is x
    with pytest.raises(ValueError, match="threshold"):
        x.replace(threshold=2.0)
    with pytest.raises(ValueError, match="valid options: .*threshold"):
        x.replace(treshold=0.5)
    assert x.config()["stride"] == 16 and "name" not in x.config()


def test_per_head_values_are_normalised_to_tuples():
    x = get_method("xattention", threshold=[0.5, 0.9])
    assert x.threshold == (0.5, 0.9)
    x = get_method("xattention", threshold=torch.tensor([[0.5, 0.9], [0.1, 0.2]], dtype=torch.float64))
    assert x.threshold == ((0.5, 0.9), (0.1, 0.2))
    with pytest.raises(ValueError, match="rows of one non-zero length"):
        get_method("xattention", threshold=[[0.5], [0.1, 0.2]])
    with pytest.raises(ValueError, match=r"threshold\[1\]"):
        get_method("xattention", threshold=[0.5, 1.5])


def test_method_objects_are_dataclasses_with_a_name():
    for name in list_methods():
        m = get_method(name)
        assert m.name == name and m.kind == "prefill" and dataclasses.is_dataclass(m)


def test_layer_methods_spec():
    lm = LayerMethods({"default": ("xattention", {"threshold": 0.8}), "layers": {0: "dense", "1": {"name": "dense"},
                                                                                 3: get_method("streaming")}})
    assert lm.for_layer(0).name == "dense" and lm[1].name == "dense" and lm[3].name == "streaming"
    assert lm[2].name == "xattention" and lm[2].threshold == 0.8
    assert lm[2] is lm[7]  # one object shared by the default layers
    assert LayerMethods("streaming")[5].name == "streaming"
    assert LayerMethods()[0].name == "dense"
    assert LayerMethods({"layers": {0: "xattention"}})[1].name == "dense"
    assert "xattention" in repr(lm)
    same = LayerMethods(lm)
    assert same[0] is lm[0]


def test_layer_methods_reject_bad_specs_early():
    with pytest.raises(ValueError, match="unknown prefill method"):
        LayerMethods({"default": "xattention", "layers": {0: "dens"}})
    with pytest.raises(ValueError, match="threshold"):
        LayerMethods({"default": ("xattention", {"threshold": 3.0})})
    with pytest.raises(ValueError, match="'default' and 'layers'"):
        LayerMethods({"default": "dense", "layer": {}})
    with pytest.raises(ValueError, match="non-negative ints"):
        LayerMethods({"layers": {-1: "dense"}})
    with pytest.raises(ValueError, match="expected a method name"):
        LayerMethods({"layers": {0: 42}})
    with pytest.raises(ValueError, match="layer_idx"):
        LayerMethods("dense").for_layer(-1)


def test_registering_needs_a_unique_name():
    @dataclasses.dataclass(kw_only=True)
    class Nameless(M.PrefillMethod):
        pass

    with pytest.raises(ValueError, match="name"):
        M.register(Nameless)

    @dataclasses.dataclass(kw_only=True)
    class Clash(M.PrefillMethod):
        name = "dense"

    with pytest.raises(ValueError, match="already registered"):
        M.register(Clash)


@pytest.mark.parametrize("name", ["streaming", "tri_shape", "power", "moa", "dense"])
def test_static_plans_are_built_once_per_config_and_shape(name, monkeypatch):
    from sparseattn.methods import base

    monkeypatch.setattr(base, "_STATIC_PLANS", {})
    method = get_method(name, block_size=64)
    assert method.static
    q, k = torch.randn(1, 4, 300, 16), torch.randn(1, 2, 300, 16)
    built = []
    real = type(method)._plan

    def counting(self, *a, **kw):
        built.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(method), "_plan", counting)
    first = method.plan(q, k, k)
    assert method.plan(torch.randn_like(q), torch.randn_like(k), k) is first and len(built) == 1
    fresh = real(method, q, k, k, causal=True, layer_idx=None)  # the cached plan is the plan
    assert torch.equal(first.to_dense_mask(), fresh.to_dense_mask())
    # Another shape, another config or another causality builds a new plan.
    method.plan(q[:, :, :200], k[:, :, :250], k[:, :, :250])
    method.replace(block_size=32).plan(q, k, k)
    assert len(built) == 3
    if name == "dense":  # the only static method that also plans non-causal attention
        method.plan(q, k, k, causal=False)
        assert len(built) == 4
    # Bounded: old entries go first.
    for n in range(base.MAX_STATIC_PLANS + 3):
        method.plan(q[:, :, : 10 + n], k[:, :, : 10 + n], k[:, :, : 10 + n])
    assert len(base._STATIC_PLANS) == base.MAX_STATIC_PLANS
