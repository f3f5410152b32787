"""Training and fine-tuning on tiny configs: a plain loop, transformers' Trainer, padded batches, LoRA."""

import re

import pytest
import torch
from conftest import ROOT
from model_helpers import VOCAB, model_pair, replit_config

from replit_lm.modeling_replit_lm import TRANSFORMERS_5, ReplitLM

LORA_TARGETS = ["Wqkv", "out_proj", "up_proj", "down_proj"]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return ReplitLM(replit_config(**overrides))


def repetitive_batch(batch=4, length=24, seed=0):
    """Sequences with structure to learn (a short random pattern repeated)."""
    generator = torch.Generator().manual_seed(seed)
    pattern = torch.randint(3, VOCAB, (batch, 6), generator=generator)
    return pattern.repeat(1, length // 6)


def loss_after_steps(model, batch, steps, lr=3e-3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_few_optimizer_steps_lower_the_loss():
    losses = loss_after_steps(tiny_model(), repetitive_batch(), steps=15)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_training_batch_gives_the_loss_of_the_unpadded_sequences(padding_side):
    """Pads masked out of attention leave each sequence's loss as it would be alone, whether they are labelled -100
    or the labels are the input ids, pads included (a pad is then neither predicted nor a predictor)."""
    model = tiny_model(seed=1).train()
    short, long = repetitive_batch(1, 12, seed=2)[0], repetitive_batch(1, 18, seed=3)[0]
    pad = torch.full((6,), 2)
    ids = torch.stack([torch.cat([pad, short]) if padding_side == "left" else torch.cat([short, pad]), long])
    mask = (torch.arange(18) >= 6) if padding_side == "left" else (torch.arange(18) < 12)
    mask = torch.stack([mask, torch.ones(18, dtype=torch.bool)]).long()
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(ids, attention_mask=mask).logits
    alone = model(short[None]).logits[0]
    real = mask[0].bool()
    torch.testing.assert_close(logits[0, real], alone, atol=1e-4, rtol=0)
    # The batch loss is the token-weighted mean of the two sequences' losses.
    batch_loss = model(ids, attention_mask=mask, labels=labels).loss
    loss_short = model(short[None], labels=short[None]).loss
    loss_long = model(long[None], labels=long[None]).loss
    expected = (loss_short * 11 + loss_long * 17) / 28
    torch.testing.assert_close(batch_loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=ids).loss, expected, atol=1e-5, rtol=1e-5)
    # transformers' Trainer passes num_items_in_batch counted as the labels[:, 1:] (4.x: the labels) that are not
    # -100: pads left as labels, and with left padding the first token (predicted from a pad), are among them. The
    # loss of a batch stays the mean over its real targets (Trainer's loss was 1.06 where it was 1.40 before).
    for given in (labels, ids):
        counted = (given[:, 1:] if TRANSFORMERS_5 else given).ne(-100).sum()
        loss = model(ids, attention_mask=mask, labels=given, num_items_in_batch=counted).loss
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_gradients_match_the_reference(padding_side):
    """Loss and every parameter's gradient against transformers' MptForCausalLM on a padded float32 batch. MPT lets a
    pad predict the token after it, which ReplitLM never does (see _loss): the labels leave no target to a pad
    position, so that both models compute the same objective."""
    model, ref = model_pair("six_heads")
    model.train(), ref.train()
    ids = repetitive_batch(3, 12, seed=14)
    lengths = torch.tensor([12, 7, 3])
    positions = torch.arange(12)
    real = positions >= 12 - lengths[:, None] if padding_side == "left" else positions < lengths[:, None]
    mask = real.long()
    after_a_token = real & torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], dim=1)
    labels = ids.masked_fill(~after_a_token, -100)
    losses = []
    for m in (model, ref):
        m.zero_grad()
        loss = m(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    ref_grads = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_a_micro_batch_without_targets_adds_nothing_to_an_accumulated_loss():
    """With attention_mask and num_items_in_batch (as Trainer passes them), a micro-batch whose labels all fall on
    padding or are -100 gave a NaN loss (0 / 0): it has nothing to add, 0, and a zero gradient."""
    model = tiny_model(seed=18).train()
    ids = repetitive_batch(2, 8, seed=19)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    first_after_padding = torch.full_like(ids, -100)
    first_after_padding[0, 3] = ids[0, 3]  # a target only a pad would predict
    for labels in (torch.full_like(ids, -100), first_after_padding):
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        loss.backward()
        assert loss.item() == 0.0
        assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


def test_trainer_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(seed=4)
    batch = repetitive_batch(8, 24, seed=5)
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in batch]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    losses_before = model(batch, labels=batch).loss.item()
    trainer.train()
    losses_after = model.eval()(batch, labels=batch).loss.item()
    assert losses_after < 0.7 * losses_before, (losses_before, losses_after)


def test_lora_trains_only_the_adapters_and_they_save_and_load(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model(seed=6)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for target in LORA_TARGETS:
        assert any(f"{target}.lora_A" in n for n in trainable), target

    batch = repetitive_batch(4, 24, seed=7)
    losses = loss_after_steps(lora, batch, steps=15, lr=1e-2)
    assert losses[-1] < 0.8 * losses[0], losses
    for name, param in lora.get_base_model().named_parameters():
        if "lora_" not in name:
            base_name = name.replace(".base_layer", "")
            assert torch.equal(param, frozen[base_name]), name

    lora.eval()
    expected = lora(batch).logits
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_model(seed=6), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(batch).logits, expected, atol=1e-5, rtol=0)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged(batch).logits, expected, atol=1e-4, rtol=0)


def test_lora_with_gradient_checkpointing_needs_inputs_embeds_grads():
    """PEFT with a frozen embedding and checkpointing relies on enable_input_require_grads (a hook on wte)."""
    peft = pytest.importorskip("peft")
    model = tiny_model(seed=8)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    lora.train()
    batch = repetitive_batch(2, 12, seed=9)
    lora(batch, labels=batch).loss.backward()
    # lora_B starts at zero, so at the first step only B has a non-zero gradient; through every block's checkpoint.
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert len(grads) == len(LORA_TARGETS) * model.config.n_layers
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_trainer_with_gradient_accumulation_logs_the_mean_loss(tmp_path):
    """transformers' Trainer hands the model num_items_in_batch and then leaves the loss undivided by the accumulation
    steps: the logged loss of one optimizer step is the token-weighted mean over its micro-batches, not their sum."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(seed=10, attn_pdrop=0.0, resid_pdrop=0.0, emb_pdrop=0.0)
    batch = repetitive_batch(4, 24, seed=11)
    dataset = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in batch]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_drop_last=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    with torch.no_grad():
        micro_losses = [model(batch[i : i + 2], labels=batch[i : i + 2]).loss.item() for i in (0, 2)]
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    # Equal-length micro-batches: the token-weighted mean is the plain mean; the order of the rows does not matter.
    expected = sum(micro_losses) / 2
    assert logged == pytest.approx(expected, rel=1e-4), (logged, micro_losses)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_trainer_logs_the_mean_over_the_real_targets_of_a_padded_batch(tmp_path, padding_side):
    """transformers 4's Trainer counts the first label of every row in num_items_in_batch, which no causal LM
    predicts: its loss was below the mean, by a share that depended on the padding side (8.38 right and 8.64 left
    where the mean was 8.90, for four short files)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model(seed=20)
    ids = repetitive_batch(4, 12, seed=21)
    positions = torch.arange(12)
    lengths = torch.tensor([[12], [5], [3], [8]])
    real = positions >= 12 - lengths if padding_side == "left" else positions < lengths
    labels = ids.masked_fill(~real, -100)
    dataset = [{"input_ids": i, "attention_mask": m.long(), "labels": y} for i, m, y in zip(ids, real, labels)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    with torch.no_grad():
        expected = model(ids, attention_mask=real.long(), labels=labels).loss.item()
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    assert logged == pytest.approx(expected, rel=1e-4), (logged, expected)


def test_ordinary_position_ids_change_nothing():
    """position_ids are not read for positions (ALiBi takes them from the token order), padded or not."""
    model = tiny_model(seed=12).eval()
    ids = repetitive_batch(2, 12, seed=13)[:, :8]
    expected = model(ids).logits
    torch.testing.assert_close(model(ids, position_ids=torch.arange(8)[None]).logits, expected, atol=0, rtol=0)
    mask = torch.tensor([[0, 0] + [1] * 6, [1] * 8])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers writes them for left padding
    torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=positions).logits,
                               model(ids, attention_mask=mask).logits, atol=0, rtol=0)  # fmt: skip


@pytest.mark.parametrize("lengths", [(5, 7, 4), (60, 50, 40)])  # the second: a row over PROMPT_BLOCK and max_seq_len
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_sequences_packed_into_one_row_are_each_their_own(lengths, attention):
    """DataCollatorWithFlattening packs a batch into one row, positions restarting at 0 per sequence: each sequence
    attends to itself only (they were trained on with attention across them, silently, before packing was refused
    and then supported), so the logits are those of each sequence alone, and the loss that of the padded batch."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model(seed=14).eval()
    model.set_attn_implementation(attention)
    generator = torch.Generator().manual_seed(sum(lengths))
    sequences = [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]
    packed = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences])
    assert packed["input_ids"].shape == (1, sum(lengths))
    alone = torch.cat([model(s[None]).logits for s in sequences], dim=1)
    out = model(**packed)
    torch.testing.assert_close(out.logits, alone, atol=1e-5, rtol=1e-5)
    if attention == "eager":  # the maps over the row (a block-diagonal mask then): nothing across sequences
        maps = model(**packed, output_attentions=True)
        torch.testing.assert_close(maps.logits, alone, atol=1e-5, rtol=1e-5)
        starts = torch.tensor([0, *lengths]).cumsum(0)
        for weights in maps.attentions:  # (1, heads, row, row)
            for first, end in zip(starts[:-1], starts[1:]):
                assert weights[0, :, first:end, :first].abs().sum() == 0
    padded = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=0)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(n, dtype=torch.long) for n in lengths], batch_first=True)
    labels = padded.masked_fill(mask == 0, -100)
    expected = model(padded, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    # Packed by hand, labels=input_ids: no -100 at the sequences' first tokens, and still no target across them.
    unlabelled = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    torch.testing.assert_close(model(**unlabelled, labels=packed["input_ids"]).loss, expected, atol=1e-5, rtol=1e-5)


def test_packed_rows_in_a_padded_batch():
    """Rows that each pack sequences, padded to one length (left padding here, whose positions transformers writes
    as 1): every real token's logits are its sequence's alone."""
    model = tiny_model(seed=15).eval()
    generator = torch.Generator().manual_seed(15)
    a, b, c = (torch.randint(3, VOCAB, (n,), generator=generator) for n in (5, 3, 6))
    ids = torch.stack([torch.cat([a, b]), torch.cat([torch.zeros(2, dtype=torch.long), c])])
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [1, 1, 0, 1, 2, 3, 4, 5]])
    out = model(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out[0], torch.cat([model(a[None]).logits[0], model(b[None]).logits[0]]), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(out[1, 2:], model(c[None]).logits[0], atol=1e-5, rtol=1e-5)
    # A pad inside a sequence too: each sequence in a row of its own (the default) and the block-diagonal mask over
    # the whole row (taken for attention maps) agree, the gap kept as in the row.
    mask[0, 6] = 0
    unpacked = model(ids, attention_mask=mask, position_ids=positions).logits
    model.set_attn_implementation("eager")
    over_the_row = model(ids, attention_mask=mask, position_ids=positions, output_attentions=True).logits
    torch.testing.assert_close(unpacked[mask.bool()], over_the_row[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("output_attentions", [False, True])
def test_padding_beside_packed_rows_does_not_count_toward_max_seq_len(padding_side, output_attentions):
    """Padding carries on the number of the sequence it follows (or precedes): it was counted in that sequence's
    length, and a batch whose packed sequences all fit in max_seq_len (8 here) was refused ("sequence length 9").
    Every real token's logits are MptForCausalLM's for its sequence alone (float32, 1e-4 absolute)."""
    model, ref = model_pair("six_heads", max_seq_len=8)
    model.set_attn_implementation("eager")  # output_attentions: the block-diagonal mask over the row
    # Per row, padded to 13 tokens (3 and 0 of them padding): the sequence beside the padding is 6 long, 9 with it.
    lengths = [(4, 6), (5, 8)] if padding_side == "right" else [(6, 4), (8, 5)]
    generator = torch.Generator().manual_seed(int(torch.randint(1000, ())))
    ids = torch.randint(3, VOCAB, (2, 13), generator=generator)
    mask = torch.zeros(2, 13, dtype=torch.long)
    positions = torch.ones(2, 13, dtype=torch.long)  # as transformers writes them at padding
    for row, row_lengths in enumerate(lengths):
        start = 13 - sum(row_lengths) if padding_side == "left" else 0
        mask[row, start : start + sum(row_lengths)] = 1
        positions[row, start : start + sum(row_lengths)] = torch.cat([torch.arange(n) for n in row_lengths])
    out = model(ids, attention_mask=mask, position_ids=positions, output_attentions=output_attentions).logits
    for row, row_lengths in enumerate(lengths):
        first = 13 - sum(row_lengths) if padding_side == "left" else 0
        for n in row_lengths:
            alone = ref(ids[row : row + 1, first : first + n]).logits[0]
            torch.testing.assert_close(out[row, first : first + n], alone, atol=1e-4, rtol=0)
            first += n


@pytest.mark.parametrize("output_attentions", [False, True])
def test_a_pad_between_two_packed_sequences_does_not_join_them(output_attentions):
    """A sequence whose first token (position 0) follows padding, not the last token of the sequence before: it
    begins a sequence of its own. Its restart was looked for between adjacent real tokens only, so it was missed and
    the sequence attended to the one before it (logits off by about 6 on this model). Logits against
    MptForCausalLM on each sequence alone (float32, 1e-4 absolute), the loss against the mean of their losses."""
    model, ref = model_pair("six_heads")
    model.set_attn_implementation("eager")  # output_attentions: the block-diagonal mask over the row
    generator = torch.Generator().manual_seed(int(torch.randint(1000, ())))
    ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 9])
    positions = torch.tensor([[0, 1, 2, 1, 1, 0, 1, 2, 3], list(range(9))])  # transformers writes 1 at padding
    out = model(ids, attention_mask=mask, position_ids=positions, labels=ids, output_attentions=output_attentions)
    pieces = [(0, slice(0, 3)), (0, slice(5, 9)), (1, slice(0, 9))]
    losses, targets = [], []
    for row, span in pieces:
        alone = ref(ids[row : row + 1, span], labels=ids[row : row + 1, span])
        torch.testing.assert_close(out.logits[row, span], alone.logits[0], atol=1e-4, rtol=0)
        losses.append(alone.loss * (span.stop - span.start - 1))
        targets.append(span.stop - span.start - 1)
    torch.testing.assert_close(out.loss, sum(losses) / sum(targets), atol=1e-5, rtol=1e-5)


def test_position_ids_that_neither_count_up_nor_restart_are_refused():
    model = tiny_model(seed=12).eval()
    ids = repetitive_batch(2, 12, seed=13)[:, :8]
    with pytest.raises(ValueError, match="row 0 goes from 2 to 5"):
        model(ids[:1], position_ids=torch.tensor([[0, 1, 2, 5, 6, 7, 8, 9]]))
    cache = model(ids[:1, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="after a cache's past"):  # a restart within the new tokens of a step
        model(ids[:1, 4:], past_key_values=cache, position_ids=torch.tensor([[4, 5, 0, 1]]))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len=64"):  # held per sequence
        model(torch.randint(3, VOCAB, (1, 69)), position_ids=torch.cat([torch.arange(4), torch.arange(65)])[None])


def test_position_ids_of_other_tokens_are_refused():
    """Positions are read to find packed sequences: a restart in positions of another length failed with an
    IndexError deep in the unpacking (or, longer, cut the sequences elsewhere, silently), another batch in a
    broadcast, and a list was silently ignored."""
    model = tiny_model(seed=12).eval()
    ids = repetitive_batch(2, 12, seed=13)[:, :6]
    for positions in ([[0, 1, 0, 1]], [[0, 1, 2, 0, 1, 2, 3, 4]], [[0, 1, 2, 0, 1, 2]] * 3, [[[0, 1, 2, 0, 1, 2]]]):
        shape = tuple(torch.tensor(positions).shape)
        with pytest.raises(ValueError, match=re.escape(f"position_ids must have shape (batch, new tokens) = (2, 6) "
                                                       f"or (1, 6), got {shape}")):  # fmt: skip
            model(ids, position_ids=torch.tensor(positions), labels=ids)
    with pytest.raises(TypeError, match="position_ids must be a torch.Tensor, got list"):
        model(ids, position_ids=[[0, 1, 2, 0, 1, 2]])
    one_row, per_row = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    torch.testing.assert_close(model(ids, position_ids=one_row).logits, model(ids, position_ids=per_row).logits)


def test_label_smoothing_through_the_loss_of_the_docs(tmp_path):
    """Trainer shifts the labels for label_smoothing_factor only for the causal LMs it knows by class name: for this
    model it smoothed a loss on unshifted labels, each position predicting its own token. docs/training.md's loss,
    passed as compute_loss_func, gives what MptForCausalLM gets from label_smoothing_factor on the same weights."""
    from transformers import Trainer, TrainingArguments

    section = (ROOT / "docs" / "training.md").read_text().split("## Label smoothing\n", 1)[1]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    namespace = {}
    exec(code, namespace)
    model, ref = model_pair("pow2_heads")
    ids = repetitive_batch(2, 12, seed=15)
    labels = ids.masked_fill(torch.arange(12) >= 9, -100)

    def trainer_loss(m, **kwargs):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs.pop("args", {}))
        return Trainer(model=m, args=args, **kwargs).compute_loss(m, {"input_ids": ids, "labels": labels.clone()})

    expected = trainer_loss(ref, args=dict(label_smoothing_factor=0.1))
    unshifted = trainer_loss(model, args=dict(label_smoothing_factor=0.1))
    assert (unshifted - expected).abs() > 0.05, "Trainer shifts for this model now: the docs' warning is wrong"
    got = trainer_loss(model, compute_loss_func=namespace["smoothed_causal_lm_loss"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_label_errors_name_the_argument_at_fault():
    """Labels as a list failed on `.shape` (AttributeError), and a bad id in shift_labels was blamed on labels."""
    model = tiny_model(seed=16)
    ids = repetitive_batch(2, 6, seed=17)
    with pytest.raises(TypeError, match="labels must be a torch.Tensor of shape \\(batch, seq_len\\), got list"):
        model(ids, labels=ids.tolist())
    shifted = torch.full_like(ids, -100)
    shifted[1, 2] = VOCAB
    with pytest.raises(ValueError, match=f"^shift_labels contains {VOCAB}, outside the vocabulary"):
        model(ids, labels=ids, shift_labels=shifted)
    # shift_labels are held to what labels are: fractions were silently rounded down, a list failed on .shape.
    with pytest.raises(ValueError, match="^shift_labels must be token ids \\(an integer tensor\\), got torch.float32"):
        model(ids, labels=ids, shift_labels=torch.full(ids.shape, 2.5))
    with pytest.raises(ValueError, match="^shift_labels must be token ids .* got torch.bool"):
        model(ids, labels=ids, shift_labels=ids > 50)
    with pytest.raises(TypeError, match="^shift_labels must be a torch.Tensor of shape \\(batch, seq_len\\), got list"):
        model(ids, labels=ids, shift_labels=ids.tolist())
    with pytest.raises(ValueError, match=r"^shift_labels must have shape \(2, 6\), got \(2, 5\)"):
        model(ids, labels=ids, shift_labels=ids[:, 1:])
