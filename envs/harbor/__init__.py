"""Harbor task directories as environments (see docs/harbor.md).

tasks.load_tasks(source...)         -> [HarborTask]   (dirs, dataset folders, registry.json,
                                                       bundled[:train|:test])
builders.HarborDatasetBuilder(cfg)  -> (train, eval)  verifier-rewarded episodes
builders.HarborDistillationDatasetBuilder(cfg)        zero reward, privileged teacher view
grader.HarborGrader(task).grade(sandbox)              Harbor's verifier, via Sandbox
bash_tool.HarborBashTool(sandbox).bash                the episode's one tool
check.check_tasks(tasks, factory, agent)              oracle / no-op check of task directories
"""
