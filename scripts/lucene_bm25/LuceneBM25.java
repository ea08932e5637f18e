// Lucene's own BM25 over the bundled sample, the reference that tests/test_bm25.py holds msmarco/bm25.py to.
// Lucene 9 as Anserini 0.21 packs it: StandardTokenizer, EnglishPossessiveFilter, LowerCaseFilter, Lucene's English
// stop words and EnglishMinimalStemFilter (msmarco/bm25.py's stemmer, where Anserini's default is Porter's), then
// BM25Similarity(k1 0.9, b 0.4) and Anserini's bag-of-words query. Run by make_reference.sh.
//   java LuceneBM25 score DOCS.tsv QUERIES.tsv CANDIDATES.tsv   -> qid \t pid \t score, every candidate
//   java LuceneBM25 words < LINES                              -> each line's terms, space-separated
import java.io.*;
import java.nio.charset.StandardCharsets;
import java.nio.file.*;
import java.util.*;
import org.apache.lucene.analysis.*;
import org.apache.lucene.analysis.en.*;
import org.apache.lucene.analysis.standard.StandardTokenizer;
import org.apache.lucene.analysis.tokenattributes.CharTermAttribute;
import org.apache.lucene.document.*;
import org.apache.lucene.index.*;
import org.apache.lucene.search.*;
import org.apache.lucene.search.similarities.BM25Similarity;
import org.apache.lucene.store.ByteBuffersDirectory;
import io.anserini.search.query.BagOfWordsQueryGenerator;

public class LuceneBM25 {
  static Analyzer analyzer() {
    return new Analyzer() {
      protected TokenStreamComponents createComponents(String field) {
        Tokenizer source = new StandardTokenizer();
        TokenStream r = new EnglishPossessiveFilter(source);
        r = new LowerCaseFilter(r);
        r = new StopFilter(r, EnglishAnalyzer.ENGLISH_STOP_WORDS_SET);
        r = new EnglishMinimalStemFilter(r);
        return new TokenStreamComponents(source, r);
      }
    };
  }

  static List<String> terms(Analyzer a, String text) throws IOException {
    List<String> out = new ArrayList<>();
    try (TokenStream ts = a.tokenStream("contents", text)) {
      CharTermAttribute t = ts.addAttribute(CharTermAttribute.class);
      ts.reset();
      while (ts.incrementToken()) out.add(t.toString());
      ts.end();
    }
    return out;
  }

  static List<String[]> rows(String path) throws IOException {
    List<String[]> out = new ArrayList<>();
    for (String line : Files.readAllLines(Paths.get(path), StandardCharsets.UTF_8)) out.add(line.split("\t", 2));
    return out;
  }

  public static void main(String[] args) throws Exception {
    Analyzer a = analyzer();
    PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), true, "UTF-8");
    if (args[0].equals("words")) {
      BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
      for (String line; (line = in.readLine()) != null; ) out.println(String.join(" ", terms(a, line)));
      return;
    }
    BM25Similarity sim = new BM25Similarity(0.9f, 0.4f);
    ByteBuffersDirectory dir = new ByteBuffersDirectory();
    try (IndexWriter w = new IndexWriter(dir, new IndexWriterConfig(a).setSimilarity(sim))) {
      for (String[] doc : rows(args[1])) {
        Document d = new Document();
        d.add(new StringField("id", doc[0], Field.Store.YES));
        d.add(new TextField("contents", doc[1], Field.Store.NO));
        w.addDocument(d);
      }
    }
    IndexReader reader = DirectoryReader.open(dir);
    IndexSearcher searcher = new IndexSearcher(reader);
    searcher.setSimilarity(sim);
    Map<String, List<String>> candidates = new LinkedHashMap<>();
    for (String[] c : rows(args[3])) candidates.computeIfAbsent(c[0], k -> new ArrayList<>()).add(c[1]);
    for (String[] q : rows(args[2])) {
      Query query = new BagOfWordsQueryGenerator().buildQuery("contents", a, q[1]);
      Map<String, Float> scores = new HashMap<>();
      for (ScoreDoc sd : searcher.search(query, reader.maxDoc()).scoreDocs)
        scores.put(searcher.doc(sd.doc).get("id"), sd.score);
      for (String pid : candidates.get(q[0])) out.println(q[0] + "\t" + pid + "\t" + scores.getOrDefault(pid, 0f));
    }
  }
}
