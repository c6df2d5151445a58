"""Methods and optimizers of the user's own, registered by an importable module."""

from __future__ import annotations

import pytest

from conftest import output

EXTENSION = """
from pytest_vram.methods import Method, register


class HeadOnly(Method):
    '''Trains only the LM head: an in-house method the built-ins don't have.'''

    name = "head-only"
    options = {}

    def prepare(self, model, spec):
        model.requires_grad_(False)
        model.get_output_embeddings().requires_grad_(True)
        return model


register(HeadOnly())
"""

TESTS = """
import pytest

@pytest.mark.vram_budget(gb=1, model="tiny-llama", batch=1, seq=32)
def test_head_only(vram):
    head = vram.step(method="head-only")
    full = vram.step(method="full")
    assert head.trainable_params == 2048 * 256  # vocab x hidden of tiny-llama's lm_head
    vram.assert_lt(head, full, term="optimizer")
"""


def test_registered_method_runs_in_the_worker_child(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(my_methods=EXTENSION, test_ext=TESTS)
    pytester.makeconftest("import my_methods  # registers head-only")
    result = pytester.runpytest("-p", "no:cacheprovider", "--vram-update")
    result.assert_outcomes(passed=1)
    assert "head-only" in output(result)
    # Registrations belong to that session: an in-process run leaves the registry as it was.
    from pytest_vram.methods import METHODS, extension_modules

    assert "head-only" not in METHODS
    assert "my_methods" not in extension_modules()


def test_registering_a_taken_name_needs_replace() -> None:
    from pytest_vram.methods import METHODS, register

    with pytest.raises(ValueError, match="'lora' is already registered; pass replace=True"):
        register(METHODS["lora"])
