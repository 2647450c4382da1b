"""jaxdsc.models.create / list_models: names, errors, and that a built model works."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jaxdsc import models


def test_list_and_create_dscnet():
    assert "jaxdsc:dscnet" in models.list_models()
    assert models.list_models("jaxdsc:*") == sorted(n for n in models.list_models() if n.startswith("jaxdsc:"))
    net = models.create("jaxdsc:dscnet", rngs=nnx.Rngs(0), width=4, depth=1, num_classes=3)
    assert isinstance(net, models.DSCNet)
    assert net(jnp.zeros((2, 8, 8, 3))).shape == (2, 3)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model name 'jaxdsc:dscnt'.*'jaxdsc:dscnet'"):
        models.create("jaxdsc:dscnt", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'jaxdsc:dscnet'"):  # origin prefix forgotten
        models.get_builder("dscnet")
    with pytest.raises(TypeError, match="name must be a str"):
        models.get_builder(3)


def test_register_rejects_bad_and_duplicate_names():
    with pytest.raises(ValueError, match="origin:model"):
        models.register_model("dscnet")
    with pytest.raises(ValueError, match="already registered"):
        models.register_model("jaxdsc:dscnet")(lambda *, rngs: None)
