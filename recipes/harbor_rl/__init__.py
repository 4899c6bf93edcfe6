"""Reinforcement learning on Harbor tasks, rewarded by their verifiers.

python -m recipes.harbor_rl.train [key=value ...]   group-centred policy gradient
python -m recipes.harbor_rl.eval model_name=... [tasks=...] [k=1,4]   success rate, pass@k
"""
