"""leanlm's on-policy GKD batch and loss vs TRL's GKDTrainer on the same sampled completions.

Run in a venv holding TRL (it is not a leanlm dependency):
    python3 -m venv --system-site-packages /work/venvs/trl && /work/venvs/trl/bin/pip install trl==1.16.0
    /work/venvs/trl/bin/python benchmarks/check_trl_gkd_onpolicy.py

A tiny transformers Llama pair (every parameter random; vocabulary 128, so the student often samples its
end-of-sequence token) is saved and loaded by both. leanlm's student samples completions
(`leanlm.train.distill.student_samples`: 16 new tokens after 6 prompt tokens, ending each row at its first
end-of-sequence token); the very same token ids are handed to TRL's `GKDTrainer.generate_on_policy_outputs`
(through a stand-in for `model.generate` that returns them), which builds TRL's labels and attention mask,
and `GKDTrainer.compute_loss` scores them (generalized JSD, beta 0.5). Checked:
1. the labels agree: both score the sampled tokens up to and including each row's first end-of-sequence
   token, and nothing after it nor in the prompt;
2. the losses agree when TRL normalizes by the tokens it scores (`num_items_in_batch=None`, its
   `batchmean`);
3. what `Trainer` passes in training: `num_items_in_batch` counted from the labels of the batch the data
   loader gave, before `training_step` swaps in the generations; TRL's on-policy loss is then the same sum
   over a different count (reported, not a failure).
Prints one JSON object last; exits 1 when 1 or 2 fails.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
import transformers
import trl
from trl.experimental.gkd import GKDConfig, GKDTrainer

import leanlm
from leanlm.train.distill import DistillConfig, student_samples
from leanlm.train.losses import distill_loss_fn

EOS, PAD, V = 2, 2, 128


def tiny(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight[EOS] += 0.6 * model.model.norm.weight  # make the end-of-sequence token common
    model.generation_config.eos_token_id = EOS
    return model


class Sampled:
    """Stands in for model.generate: returns the completions leanlm sampled (prompt echoed first, as HF does)."""

    def __init__(self, sequences):
        self.sequences = sequences

    def generate(self, input_ids, attention_mask, generation_config, return_dict_in_generate):
        assert torch.equal(input_ids, self.sequences[:, :input_ids.shape[1]])
        return self


def main():
    P, N, B, T = 6, 16, 4, 24
    work = tempfile.mkdtemp()
    hf_s, hf_t = tiny(1), tiny(0)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), pad_token="<eos>", eos_token="<eos>")
    for name, m in (("student", hf_s), ("teacher", hf_t)):
        m.save_pretrained(f"{work}/{name}")
        tok.save_pretrained(f"{work}/{name}")
    student, _ = leanlm.load(f"{work}/student", dtype=torch.float32)
    teacher, _ = leanlm.load(f"{work}/teacher", dtype=torch.float32)
    rows = torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(0))

    torch.manual_seed(5)
    ids, labels = student_samples(student, rows, P, N, eos_ids=[EOS], pad_id=PAD)
    cfg = DistillConfig(loss="jsd", beta=0.5, temperature=1.0, chunk=64)
    with torch.no_grad():
        ours, n_ours = distill_loss_fn(teacher, cfg.loss_config())(student, ids, labels)

    args = GKDConfig(output_dir=f"{work}/trl", lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=N,
                     use_cpu=True, bf16=False, fp16=False, report_to="none", per_device_train_batch_size=B,
                     max_steps=1)  # bf16 off: TRL's default would run the teacher under bf16 autocast
    from datasets import Dataset

    trainer = GKDTrainer(model=hf_s, teacher_model=hf_t, args=args, processing_class=tok,
                         train_dataset=Dataset.from_dict({"input_ids": rows.tolist()}),
                         data_collator=lambda b: b)
    prompts = rows[:, :P]
    t_ids, t_mask, t_labels = trainer.generate_on_policy_outputs(
        Sampled(ids), {"prompts": prompts, "prompt_attention_mask": torch.ones_like(prompts)},
        trainer.generation_config)
    inputs = {"input_ids": t_ids, "attention_mask": t_mask, "labels": t_labels}
    with torch.no_grad():
        trl_mean = float(trainer.compute_loss(trainer.model, inputs, num_items_in_batch=None))
        original = int((rows[:, 1:] != -100).sum())  # what Trainer counts from the data loader's batch
        trl_trainer = float(trainer.compute_loss(trainer.model, inputs, num_items_in_batch=torch.tensor(original)))
    scored = int((t_labels[:, 1:] != -100).sum())
    ended = int(((labels[:, P:] == EOS) & (labels[:, P:] != -100)).any(1).sum())
    same_labels = torch.equal(labels, t_labels)
    diff = abs(float(ours) - trl_mean)
    out = {"trl": trl.__version__, "rows": B, "prompt": P, "new_tokens": N, "rows_ended_by_eos": ended,
           "scored_tokens": scored, "leanlm_scored": n_ours, "same_labels": same_labels,
           "leanlm_loss": float(ours), "trl_loss_per_scored_token": trl_mean, "abs_diff": diff,
           "trl_loss_as_trained": trl_trainer, "trainer_num_items_in_batch": original,
           "ratio_as_trained": trl_trainer / trl_mean}
    print(json.dumps(out))
    return 0 if same_labels and ended and diff < 1e-5 * max(1.0, abs(trl_mean)) else 1


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(V)}
    vocab["<eos>"] = vocab.pop(f"t{EOS}")  # the end-of-sequence token is also the padding token (PAD == EOS)
    return Tokenizer(models.WordLevel(vocab, unk_token="t0"))


if __name__ == "__main__":
    sys.exit(main())
