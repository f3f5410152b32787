"""transformers' own model test suite (ModelTesterMixin, GenerationTesterMixin) on a tiny ReplitLM, the way transformers
runs it on its own models; modelled on transformers' MPT model test (tests/models/mpt/test_modeling_mpt.py).

transformers' test files are not part of its wheel: they are placed in tests/transformers_suite/ (see the README
there), at the release that is installed. Where they are missing, or on transformers 4, this module is skipped.
"""

import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import transformers

SUITE = Path(__file__).resolve().parent / "transformers_suite"
RELEASE_FILE = SUITE / "RELEASE"

if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("transformers' test suite is run on transformers 5 only", allow_module_level=True)
if not (SUITE / "test_modeling_common.py").exists():
    pytest.skip(
        "transformers' test files are not in tests/transformers_suite/ (see its README for how to get them)",
        allow_module_level=True,
    )
if RELEASE_FILE.exists() and RELEASE_FILE.read_text().strip() != transformers.__version__:
    pytest.skip(
        f"tests/transformers_suite/ holds the tests of transformers {RELEASE_FILE.read_text().strip()}, but "
        f"{transformers.__version__} is installed",
        allow_module_level=True,
    )

pytest.importorskip("parameterized", reason="transformers' test files import the parameterized package")

# Mixins of transformers' test files that are not in its source distribution: where the file is absent, the mixin is
# empty, and test_optional_mixins_ran names it as skipped in the summary. (The export tests need exporters, ONNX,
# OpenVINO and others, that the model does not claim.)
OPTIONAL_MIXINS = {"exporters/test_export.py": "ExportTesterMixin", "generation/test_utils.py": "GenerationTesterMixin"}
# The keyword arguments of every config, which ConfigTester checks; where absent, test_config is skipped.
CONFIG_KWARGS = "utils/test_configuration_utils.py"
for path, name in [*OPTIONAL_MIXINS.items(), (CONFIG_KWARGS, "config_common_kwargs")]:
    if not (SUITE / path).exists():
        package, module = "transformers_suite." + path.split("/")[0], "transformers_suite." + path[:-3].replace("/", ".")
        for module_name in (package, module):
            sys.modules.setdefault(module_name, types.ModuleType(module_name))
        setattr(sys.modules[module], name, type(name, (), {}) if name in OPTIONAL_MIXINS.values() else None)

import torch  # noqa: E402
from transformers.models.auto import configuration_auto, modeling_auto  # noqa: E402
from transformers.testing_utils import torch_device  # noqa: E402
from transformers_suite.generation.test_utils import GenerationTesterMixin  # noqa: E402
from transformers_suite.test_configuration_common import ConfigTester  # noqa: E402
from transformers_suite.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402

from replit_lm.configuration_replit_lm import ReplitLMConfig  # noqa: E402
from replit_lm.modeling_replit_lm import ReplitLM, ReplitLMModel  # noqa: E402


ATTENTION_WIDTH = (
    "expects attention maps as wide as generate's static cache; ReplitLM's are as wide as the keys filled so far "
    "(see the README)"
)


class ReplitLMModelTester:
    """The MPT tester's shapes: vocab 99, d_model 48, 4 heads, 2 layers, batch 14 x 7 tokens."""

    def __init__(self, parent, batch_size=14, seq_length=7, vocab_size=99, hidden_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=512):  # fmt: skip
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        # As in the MPT tester: the last id is bos, eos and pad at once.
        self.pad_token_id = self.eos_token_id = self.bos_token_id = vocab_size - 1

    def get_config(self) -> ReplitLMConfig:
        return ReplitLMConfig(
            vocab_size=self.vocab_size,
            d_model=self.hidden_size,
            n_layers=self.num_hidden_layers,
            n_heads=self.num_attention_heads,
            max_seq_len=self.max_position_embeddings,
            attn_pdrop=0.1,
            resid_pdrop=0.1,
            emb_pdrop=0.1,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, _ = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids}

    def check_model(self, config, input_ids, input_mask):
        model = ReplitLMModel(config).to(torch_device).eval()
        result = model(input_ids, attention_mask=input_mask)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(len(result.past_key_values), config.n_layers)

    def check_past(self, config, input_ids, input_mask):
        """One more token against the cache equals the whole sequence without it."""
        model = ReplitLMModel(config).to(torch_device).eval()
        past = model(input_ids, use_cache=True).past_key_values
        next_tokens = ids_tensor((self.batch_size, 1), config.vocab_size)
        full = model(torch.cat([input_ids, next_tokens], dim=-1)).last_hidden_state[:, -1]
        cached = model(next_tokens, past_key_values=past).last_hidden_state[:, 0]
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)

    def check_attention_mask_past(self, config, input_ids, input_mask):
        """The MPT test's hole: the second half of the prompt is masked, then a real token follows; changing a masked
        token changes nothing."""
        model = ReplitLMModel(config).to(torch_device).eval()
        mask = torch.ones_like(input_ids)
        half = self.seq_length // 2
        mask[:, half:] = 0
        past = model(input_ids, attention_mask=mask, use_cache=True).past_key_values
        input_ids = input_ids.clone()
        input_ids[:, -(ids_tensor((1,), half).item() + 1)] = ids_tensor((self.batch_size,), config.vocab_size)
        next_tokens = ids_tensor((self.batch_size, 1), config.vocab_size)
        mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
        full = model(torch.cat([input_ids, next_tokens], dim=-1), attention_mask=mask).last_hidden_state[:, -1]
        cached = model(next_tokens, past_key_values=past, attention_mask=mask).last_hidden_state[:, 0]
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)

    def check_past_large_inputs(self, config, input_ids, input_mask):
        """Three new tokens, with a random mask, against the cache."""
        model = ReplitLMModel(config).to(torch_device).eval()
        past = model(input_ids, attention_mask=input_mask, use_cache=True).past_key_values
        next_tokens = ids_tensor((self.batch_size, 3), config.vocab_size)
        mask = torch.cat([input_mask, ids_tensor((self.batch_size, 3), vocab_size=2)], dim=-1)
        full = model(torch.cat([input_ids, next_tokens], dim=-1), attention_mask=mask).last_hidden_state[:, -3:]
        cached = model(next_tokens, attention_mask=mask, past_key_values=past).last_hidden_state
        # Rows whose every key is masked are not compared: their softmax has no real key to weigh.
        seen = mask.bool().cumsum(-1)[:, -3:] > 0
        torch.testing.assert_close(cached[seen], full[seen], atol=1e-4, rtol=0)

    def check_lm_head_and_backward(self, config, input_ids, input_mask, gradient_checkpointing=False):
        model = ReplitLM(config).to(torch_device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
        result = model(input_ids, labels=input_ids)
        self.parent.assertEqual(result.loss.shape, ())
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        result.loss.backward()


def auto_class_registrations():
    """Patches that make ReplitLM one of transformers' own architectures for as long as they are active, as the suite
    expects of the models it tests: it picks the tests to run by the auto mappings (a causal LM gets labels and the
    loss tests, a base model is left out of training tests, ...). Undone afterwards, so that the other test files
    keep loading the model as remote code."""
    return [
        mock.patch.dict(configuration_auto.CONFIG_MAPPING_NAMES, {"replit_lm": "ReplitLMConfig"}),
        mock.patch.dict(configuration_auto.CONFIG_MAPPING._extra_content, {"replit_lm": ReplitLMConfig}),
        mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {"replit_lm": "ReplitLMModel"}),
        mock.patch.dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {"replit_lm": "ReplitLM"}),
        mock.patch.dict(modeling_auto.MODEL_MAPPING._extra_content, {ReplitLMConfig: ReplitLMModel}),
        mock.patch.dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, {ReplitLMConfig: ReplitLM}),
    ]


class ReplitLMTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    # PipelineTesterMixin is left out: it runs the pipelines on transformers' tiny Hub models of each architecture,
    # which do not exist for a remote-code model (the text-generation pipeline is covered by test_demo.py).
    all_model_classes = (ReplitLMModel, ReplitLM)
    all_generative_model_classes = (ReplitLM,)

    @classmethod
    def setUpClass(cls):
        for patch in auto_class_registrations():
            patch.start()
            cls.addClassCleanup(patch.stop)

    def setUp(self):
        self.model_tester = ReplitLMModelTester(self)
        self.config_tester = ConfigTester(self, config_class=ReplitLMConfig, d_model=48, n_heads=4)

    def test_config(self):
        if not (SUITE / CONFIG_KWARGS).exists():
            self.skipTest(f"tests/transformers_suite/{CONFIG_KWARGS} is absent")
        self.config_tester.run_common_tests()

    @unittest.skip(reason=ATTENTION_WIDTH)
    def test_greedy_generate_dict_outputs_use_cache(self):
        pass

    @unittest.skip(reason=ATTENTION_WIDTH)
    def test_beam_search_generate_dict_outputs_use_cache(self):
        pass

    def test_model(self):
        self.model_tester.check_model(*self.model_tester.prepare_config_and_inputs())

    def test_model_six_heads(self):
        """Head counts that are not a power of two: MPT's interleaved ALiBi slopes."""
        config, input_ids, input_mask = self.model_tester.prepare_config_and_inputs()
        config.n_heads = 6
        self.model_tester.check_model(config, input_ids, input_mask)

    def test_model_past(self):
        self.model_tester.check_past(*self.model_tester.prepare_config_and_inputs())

    def test_model_att_mask_past(self):
        self.model_tester.check_attention_mask_past(*self.model_tester.prepare_config_and_inputs())

    def test_model_past_large_inputs(self):
        self.model_tester.check_past_large_inputs(*self.model_tester.prepare_config_and_inputs())

    def test_lm_head_model(self):
        self.model_tester.check_lm_head_and_backward(*self.model_tester.prepare_config_and_inputs())

    def test_gradient_checkpointing_backward(self):
        self.model_tester.check_lm_head_and_backward(
            *self.model_tester.prepare_config_and_inputs(), gradient_checkpointing=True
        )


@pytest.mark.parametrize("path", OPTIONAL_MIXINS)
def test_optional_mixins_ran(path):
    if not (SUITE / path).exists():
        pytest.skip(f"tests/transformers_suite/{path} is absent, so its {OPTIONAL_MIXINS[path]} did not run")
