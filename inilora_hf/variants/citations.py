"""BibTeX of the methods, for model cards."""

INILORA = (
    "@article{xue2025inilora,\n  title={Optimizing Fine-Tuning through Advanced Initialization Strategies for "
    "Low-Rank Adaptation},\n  author={Xue, Yongfu},\n  journal={arXiv preprint arXiv:2510.03731},\n  year={2025}\n}"
)
LORA = (
    "@inproceedings{hu2022lora,\n  title={LoRA: Low-Rank Adaptation of Large Language Models},\n"
    "  author={Hu, Edward J. and others},\n  booktitle={ICLR},\n  year={2022}\n}"
)
PISSA = (
    "@article{meng2024pissa,\n  title={PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large "
    "Language Models},\n  author={Meng, Fanxu and Wang, Zhaohui and Zhang, Muhan},\n"
    "  journal={arXiv preprint arXiv:2404.02948},\n  year={2024}\n}"
)
MILORA = (
    "@article{wang2024milora,\n  title={MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM "
    "Finetuning},\n  author={Wang, Hanqing and others},\n  journal={arXiv preprint arXiv:2406.09044},\n  year={2024}\n}"
)
LORA_SB = (
    "@article{ponkshe2024lorasb,\n  title={Initialization using Update Approximation is a Silver Bullet for Extremely "
    "Efficient Low-Rank Fine-Tuning},\n  author={Ponkshe, Kaustubh and Singhal, Raghav and others},\n"
    "  journal={arXiv preprint arXiv:2411.19557},\n  year={2024}\n}"
)
OLORA = "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, arXiv:2406.01775 (2024)."
ORTHOGONAL = (
    "PEFT's `init_lora_weights='orthogonal'`, after https://datta0.github.io/posts/rethink-lora-init/"
    "#orthogonal-initialisation"
)
MICA = "Minor Component Adaptation (MiCA), arXiv:2604.01694, as implemented in PEFT 0.21 (`init_lora_weights='mica'`)."
EVA = (
    "@article{paischer2024eva,\n  title={One Initialization to Rule them All: Fine-tuning via Explained Variance "
    "Adaptation},\n  author={Paischer, Fabian and others},\n  journal={arXiv preprint arXiv:2410.07170},\n"
    "  year={2024}\n}"
)
CORDA = (
    "@article{yang2024corda,\n  title={CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for "
    "Task-Aware Parameter-Efficient Fine-tuning},\n  author={Yang, Yibo and others},\n"
    "  journal={arXiv preprint arXiv:2406.05223},\n  year={2024}\n}"
)
LORA_GA = (
    "@article{wang2024loraga,\n  title={LoRA-GA: Low-Rank Adaptation with Gradient Approximation},\n"
    "  author={Wang, Shaowen and Yu, Linxi and Li, Jian},\n  journal={arXiv preprint arXiv:2407.05000},\n"
    "  year={2024}\n}"
)
