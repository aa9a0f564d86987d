# The RL benches' `train rl` settings (sourced by gpu.sh and judges.sh): K = 8 completions
# of up to 256 tokens for 32 prompts, 256 rollouts per batch, 32 per pass. The seeds' 5e-7
# barely moves a d12 in a few minutes: 1e-5, as SFT's seeds' rate.
rl_settings=(
    --set rl.prompts=32 --set rl.samples=8 --set rl.max_new_tokens=256 --set rl.temperature=0.8
    --set train.device_batch=32 --set train.steps=1000
    --set optim.matrix_lr=1e-5 --set optim.embedding_lr=1e-5 --set optim.unembedding_lr=1e-5
    --set checkpoint.every=0 --log-every 1
)
